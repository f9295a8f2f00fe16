"""The models, in the on-disk formats of their public checkpoints.

- `openvla.py`: OpenVLA (fused DINOv2 + SigLIP vision, Llama 2) in the openvla-7b layout, its processor, the action
  tokenizer (256 bins per dimension) and LoRA injection. Used by ppo_openvla.py, sft_openvla.py and, as the OFT
  trunk, srpo_openvla_oft.py.
- `action_text.py`: InternVL's text-action template (the answer a policy writes, which slots are free and which
  tokens each may take) and the prompt. Used by grpo_internvl.py and sft_internvl.py.
- `vjepa2.py`: the V-JEPA 2 video encoder behind SRPO's progress reward. Used by srpo_openvla_oft.py.
- `tiny.py`: random tiny checkpoints of all three, written by the same code path as the real layouts, for tests and
  the CPU quickstarts (`python -m common.models.tiny openvla|internvl|vjepa2 DIR`).
"""
