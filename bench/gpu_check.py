"""One command that checks a GPU machine end to end and measures what the README reports.

    python bench/gpu_check.py --out gpu_check.json                  # GPU: 7B shapes, random weights, nothing downloaded
    python bench/gpu_check.py --size tiny --out gpu_check.json      # CPU: tiny shapes, CUDA-only parts skipped
    python bench/gpu_check.py --parts ppo_rollout grpo_decoding     # a subset (names as below)

Made for an air-gapped node with a wall-clock limit (bench/README.md: the wheels to bring and the one command):
the JSON is rewritten after every part, so a killed run keeps what finished, and each part is stopped after
--part-timeout-s (120). A failing part is reported in the table and the JSON; the others still run.

Model parts (the node's torch and transformers 5, plus peft, timm and tyro wheels):
- param_counts: parameters of the real OpenVLA-7B (= OpenVLA-OFT) and InternVL3-1B/2B shapes, on the meta device.
- ppo_rollout: ppo_openvla.py `ActorCritic.act` (prefill + 6 cached one-token decodes, LoRA rank 32 injected) at
  batch 16 and 64: actions/s, the prefill alone (`predict_value`, the same forward) and the decode time per token,
  prefill TFLOP/s = prefill tokens x 2 x parameters / time, and that as a fraction of the device's dense bf16 peak
  (`--peak-tflops`; H100/H200 SXM 989 is detected by name), peak memory.
- ppo_update: one PPO optimizer step with LoRA at micro-batch 8 (forward, backward, AdamW): time and peak memory.
- oft_forward_backward: srpo_openvla_oft.py `OFTPolicy` (56 action tokens in one pass) forward and backward at batch
  16, 32 and 64.
- grpo_decoding: grpo_internvl.py `generate_actions` against `model.generate` with a constraining logits processor
  (bench/bench_grpo_decoding.py), on an InternVL3-1B-shaped model (448 px, 256 image tokens, Qwen2-style digits)
  with grpo_internvl.py's LoRA injected.
- grpo_update: one GRPO optimizer step on that model: the teacher-forced free-slot forward, the clipped token loss,
  backward into the adapters, AdamW.
- vjepa2_embed: the progress-reward encoder (common/models/vjepa2.py) on 64-frame clips, ViT-g at 384 px.
- fsdp_step: ppo_openvla.py --fsdp on under torchrun with one rank and the tiny model, so NCCL and FSDP2 run.
Script and simulator parts (the whole requirements; they never block the model parts):
- ppo_script, grpo_script, srpo_script: each script for 2 iterations with the tiny models (README quickstart flags).
- maniskill_gpu: ManiSkill3 PushCube-v1, physx_cuda, 64 envs, rendering through common/envs/maniskill.py (CUDA only).
- libero: LIBERO libero_spatial, MuJoCo EGL on GPU (OSMesa on CPU), env steps/s through common/envs/libero.py.
The 7B models are built on the meta device and materialised with random bf16 weights: no checkpoint is written.
Peak memory is torch.cuda.max_memory_allocated on GPU and the process's max RSS on CPU (`peak_mem_kind`).
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARTS = (
    "param_counts",
    "ppo_rollout",
    "ppo_update",
    "oft_forward_backward",
    "grpo_decoding",
    "grpo_update",
    "vjepa2_embed",
    "fsdp_step",
    "ppo_script",
    "grpo_script",
    "srpo_script",
    "maniskill_gpu",
    "libero",
)
MODEL_PARTS = PARTS[:8]  # the node's torch and transformers 5 plus ~5 MB of wheels (peft, timm, tyro, ...)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity

# InternVL3 -hf shapes (InternViT-300M-448px-V2.5 + Qwen2.5-0.5B / 1.5B), as in their config.json files.
_INTERNVIT_300M = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=24,
    image_size=[448, 448],
    patch_size=[14, 14],
    layer_scale_init_value=0.1,
)
INTERNVL3 = {
    "1B": dict(
        vision_config=_INTERNVIT_300M,
        text_config=dict(
            model_type="qwen2",
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151674,
            max_position_embeddings=32768,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
    ),
    "2B": dict(
        vision_config=_INTERNVIT_300M,
        text_config=dict(
            model_type="qwen2",
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151674,
            max_position_embeddings=32768,
            rope_theta=1e6,
            tie_word_embeddings=True,
        ),
    ),
}


class Context:
    def __init__(self, args, tmp: str):
        self.args, self.tmp = args, tmp
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.size == "7b" else "cpu")
        self.cuda = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)
        self._agent = None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict:
        if self.cuda:
            return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "peak_mem_kind": "cuda_allocated"}
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
        return {"peak_mem_gib": rss_gib, "peak_mem_kind": "cpu_max_rss"}

    def peak_tflops(self):
        if self.args.peak_tflops:
            return self.args.peak_tflops
        if self.cuda:
            name = torch.cuda.get_device_name()
            return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        return None  # no meaningful bf16 peak for a CPU

    def agent(self):
        """PPO's ActorCritic over OpenVLA (7B shapes or the tiny checkpoint), LoRA rank 32 injected; built once."""
        if self._agent is None:
            from bench.bench_ppo_rollout import build

            self._agent = build(self.args.size, self.device, self.tmp)
        return self._agent


def timed(ctx: Context, fn, iters: int) -> float:
    fn()  # warm-up
    ctx.sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    ctx.sync()
    return (time.perf_counter() - start) / iters


# ---------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------
def part_param_counts(ctx: Context) -> dict:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from bench.bench_ppo_rollout import OPENVLA_7B
    from common.models.openvla import OpenVLA

    with torch.device("meta"):
        out = {"openvla_7b_params": sum(p.numel() for p in OpenVLA(OPENVLA_7B).parameters())}
        for name, config in INTERNVL3.items():
            config = InternVLConfig(**config, downsample_ratio=0.5, image_seq_length=256)
            model = InternVLForConditionalGeneration(config)
            out[f"internvl3_{name.lower()}_params"] = sum(p.numel() for p in model.parameters())
    return out


def _rollout_inputs(ctx: Context, processor, batch: int):
    prompt = processor.prompt_ids(["put the carrot on the plate"] * batch, device=ctx.device)
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=ctx.device)
    return processor.preprocess_images(images), prompt


def part_ppo_rollout(ctx: Context) -> dict:
    agent, processor = ctx.agent()
    params = sum(p.numel() for p in agent.parameters())
    out = {}
    for batch in ctx.args.rollout_batch_sizes:
        pixel_values, prompt = _rollout_inputs(ctx, processor, batch)
        ctx.reset_peak()

        def step():
            with torch.no_grad(), ctx.autocast:
                agent.act(pixel_values, *prompt, 1.0)

        def prefill():  # the same prefill without the 6 decodes: ppo_openvla.py's value-only forward
            with torch.no_grad(), ctx.autocast:
                agent.predict_value(pixel_values, *prompt)

        seconds = timed(ctx, step, ctx.args.iters)
        prefill_s = timed(ctx, prefill, ctx.args.iters)
        prefill_tokens = batch * (prompt[0].shape[1] + 256)  # prompt + 256 image patches per sample
        tflops = prefill_tokens * 2 * params / prefill_s / 1e12
        peak = ctx.peak_tflops()
        out[f"batch{batch}"] = {
            "actions_per_s": batch / seconds,
            "ms_per_step": seconds * 1e3,
            "prefill_ms": prefill_s * 1e3,
            "decode_ms_per_token": (seconds - prefill_s) / 6 * 1e3,  # 6 one-token decodes after the prefill
            "prefill_tflops": tflops,
            "prefill_flop_floor_fraction": tflops / peak if peak else None,
            **ctx.peak(),
        }
    return out


def part_ppo_update(ctx: Context) -> dict:
    agent, processor = ctx.agent()
    batch = ctx.args.micro_batch
    pixel_values, prompt = _rollout_inputs(ctx, processor, batch)
    tokens = torch.randint(agent.first_action_token, agent.first_action_token + 256, (batch, 7), device=ctx.device)
    trainable = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    agent.train()
    ctx.reset_peak()

    def step():
        with ctx.autocast:
            logprob, entropy, value = agent(pixel_values, *prompt, tokens, 1.0)
            loss = -logprob.mean() + value.pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        seconds = timed(ctx, step, ctx.args.iters)
    finally:
        agent.eval()
    return {
        "micro_batch": batch,
        "s_per_step": seconds,
        "samples_per_s": batch / seconds,
        "trainable_params": sum(p.numel() for p in trainable),
        **ctx.peak(),
    }


def part_oft_forward_backward(ctx: Context) -> dict:
    from srpo_openvla_oft import NUM_ACTION_TOKENS, OFTPolicy, bin_logprobs

    agent, processor = ctx.agent()
    policy = OFTPolicy(agent.vla, processor.tokenizer.eos_token_id)
    out = {"action_tokens": NUM_ACTION_TOKENS}
    for batch in ctx.args.oft_batch_sizes:
        pixel_values, prompt = _rollout_inputs(ctx, processor, batch)
        bins = torch.randint(0, 256, (batch, NUM_ACTION_TOKENS), device=ctx.device)
        ctx.reset_peak()

        def forward():
            with torch.no_grad(), ctx.autocast:
                policy(*prompt, pixel_values)

        def forward_backward():
            with ctx.autocast:
                logits = policy(*prompt, pixel_values).float()
            bin_logprobs(logits, 1.6).gather(-1, bins[..., None]).mean().backward()

        forward_s = timed(ctx, forward, ctx.args.iters)
        fb_s = timed(ctx, forward_backward, ctx.args.iters)
        for p in policy.parameters():
            p.grad = None
        out[f"batch{batch}"] = {
            "forward_ms": forward_s * 1e3,
            "forward_backward_ms": fb_s * 1e3,
            "chunks_per_s": batch / forward_s,
            **ctx.peak(),
        }
    return out


def _internvl_1b_shaped(ctx: Context):
    """InternVL3-1B shapes with random bf16 weights (7b) or the tiny checkpoint (tiny), plus a processor whose
    tokenizer splits digits as Qwen2's does."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from common.models.tiny import make_tiny_internvl

    image_size = 448 if ctx.args.size == "7b" else 56
    path = make_tiny_internvl(os.path.join(ctx.tmp, "internvl"), digits="single", image_size=image_size)
    if ctx.args.size == "tiny":
        return InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval(), path
    from transformers import AutoTokenizer

    config = InternVLConfig(**INTERNVL3["1B"], downsample_ratio=0.5, image_seq_length=256)
    config.image_token_id = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    model = model.to_empty(device=ctx.device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for m in model.modules():  # RoPE frequencies are non-persistent buffers: recompute them on the device
            if hasattr(m, "rope_init_fn"):
                inv_freq, m.attention_scaling = m.rope_init_fn(m.config, ctx.device)
                m.inv_freq, m.original_inv_freq = inv_freq, inv_freq
    return model.eval(), path


def _internvl_with_lora(ctx: Context):
    """The InternVL3-1B-shaped model with grpo_internvl.py's LoRA (rank 32 on the language model) injected, as a
    LoRA rollout decodes; built once."""
    if getattr(ctx, "_internvl", None) is None:
        from peft import LoraConfig, get_peft_model

        model, path = _internvl_1b_shaped(ctx)
        lora = LoraConfig(
            r=32,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        )
        ctx._internvl = get_peft_model(model, lora).to(ctx.device), path
    return ctx._internvl


def _internvl_inputs(ctx: Context, processor, batch: int):
    import grpo_internvl as grpo

    rgb = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8)
    tcp_pose = torch.tensor([[0.1, 0.0, 0.2, 0.0, 1.0, 0.0, 0.0]]).expand(batch, -1)
    return grpo.build_inputs(processor, ["push the cube to the goal region"] * batch, rgb, tcp_pose, ctx.device)


def part_grpo_decoding(ctx: Context) -> dict:
    from transformers import LogitsProcessorList

    import grpo_internvl as grpo
    from bench.bench_grpo_decoding import TemplateLogitsProcessor

    model, path = _internvl_with_lora(ctx)
    processor, template = grpo.load_processor_and_template(path)
    pad_id = processor.tokenizer.pad_token_id
    out = {"params": sum(p.numel() for p in model.parameters())}
    for batch in ctx.args.decode_batch_sizes:
        inputs = _internvl_inputs(ctx, processor, batch)
        constraint = TemplateLogitsProcessor(template, inputs["input_ids"].size(1), model.config.text_config.vocab_size)

        def ours():
            with torch.no_grad(), ctx.autocast:
                grpo.generate_actions(model, inputs, template, 1.6, 0, 1.0)

        def hf_generate():
            with torch.no_grad(), ctx.autocast:
                model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=1.6,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=template.answer_len,
                    min_new_tokens=template.answer_len,
                    logits_processor=LogitsProcessorList([constraint]),
                    pad_token_id=pad_id,
                )

        ctx.reset_peak()
        ours_s = timed(ctx, ours, ctx.args.iters)
        hf_s = timed(ctx, hf_generate, ctx.args.iters)
        out[f"batch{batch}"] = {
            "constrained_tokens_per_s": batch * template.answer_len / ours_s,
            "generate_tokens_per_s": batch * template.answer_len / hf_s,
            "speedup": hf_s / ours_s,
            **ctx.peak(),
        }
    return out


def part_grpo_update(ctx: Context) -> dict:
    """One GRPO optimizer step at micro-batch --micro-batch: grpo_internvl.py's teacher-forced free-slot forward,
    its clipped token loss on sampled answers, backward into the LoRA adapters, AdamW."""
    import grpo_internvl as grpo

    model, path = _internvl_with_lora(ctx)
    processor, template = grpo.load_processor_and_template(path)
    batch = ctx.args.micro_batch
    inputs = _internvl_inputs(ctx, processor, batch)
    with ctx.autocast:
        sampled = grpo.generate_actions(model, inputs, template, 1.6, 0, 1.0)
    answer_ids = template.assemble(sampled.tokens).to(ctx.device)
    advantages = torch.randn(batch, device=ctx.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ctx.reset_peak()

    def step():
        with ctx.autocast:
            logits = grpo.free_slot_logits(model, inputs, answer_ids, template)
        new_logprob = grpo.policy_logprobs(logits, sampled.support, 1.6).gather(2, sampled.choices[..., None])
        mask = torch.ones_like(sampled.logp)
        loss = grpo.clipped_token_loss(new_logprob.squeeze(2), sampled.logp, advantages, mask, 0.2, 0.28, mask.sum())
        loss[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(ctx, step, ctx.args.iters)
    return {"micro_batch": batch, "s_per_step": seconds, "samples_per_s": batch / seconds, **ctx.peak()}


# V-JEPA 2 ViT-g/384 (facebook/vjepa2-vitg-fpc64-384): width 1408, 40 blocks, 22 heads, MLP ratio 48/11
VJEPA2_VITG_384 = dict(
    hidden_size=1408,
    num_hidden_layers=40,
    num_attention_heads=22,
    mlp_ratio=48 / 11,
    crop_size=384,
    image_size=384,
    frames_per_clip=64,
)


def part_vjepa2_embed(ctx: Context) -> dict:
    """srpo_openvla_oft.py's progress reward encoder: V-JEPA 2 over 64-frame clips (common/models/vjepa2.py's
    preprocessing and mean pooling), ViT-g at 384 px with random bf16 weights (tiny: the tiny checkpoint)."""
    import numpy as np
    from transformers import VJEPA2Config, VJEPA2Model

    from common.models.tiny import make_tiny_vjepa2
    from common.models.vjepa2 import VideoEmbedder

    if ctx.cuda:
        with torch.device("meta"):
            model = VJEPA2Model(VJEPA2Config(**VJEPA2_VITG_384))
        model = model.to_empty(device=ctx.device).to(torch.bfloat16).eval().requires_grad_(False)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        embedder = VideoEmbedder.__new__(VideoEmbedder)  # the class's __call__ on weights built in place
        embedder.model, embedder.device, embedder.dtype = model, ctx.device, torch.bfloat16
        embedder.num_frames, embedder.offload, embedder.size = 64, False, 384
    else:
        embedder = VideoEmbedder(make_tiny_vjepa2(os.path.join(ctx.tmp, "vjepa2")), ctx.device, num_frames=16)
    videos = [np.random.randint(0, 256, (96, 128, 128, 3), dtype=np.uint8) for _ in range(ctx.args.video_batch)]
    ctx.reset_peak()
    seconds = timed(ctx, lambda: embedder(videos, batch_size=len(videos)), ctx.args.iters)
    return {
        "params": sum(p.numel() for p in embedder.model.parameters()),
        "videos": len(videos),
        "ms_per_video": seconds / len(videos) * 1e3,
        **ctx.peak(),
    }


def _run_script(ctx: Context, name: str, cmd: list[str]) -> dict:
    """One project script as a subprocess within the part's time limit; its output's tail on failure."""
    t = time.perf_counter()
    run_dir = os.path.join(ctx.tmp, "runs")
    try:
        proc = subprocess.run(
            cmd + ["--run-dir", run_dir, "--exp-name", name],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=ctx.args.part_timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        return {"status": "timeout", "error": f"{name} still running after {e.timeout} s", "wall_s": e.timeout}
    out = {"returncode": proc.returncode, "wall_s": time.perf_counter() - t}
    if proc.returncode != 0:
        out.update(status="error", error=f"{name} exited {proc.returncode}", tail=(proc.stdout + proc.stderr)[-2000:])
    return out


def part_fsdp_step(ctx: Context) -> dict:
    """ppo_openvla.py --fsdp on under torchrun with one rank (NCCL on a GPU, gloo on the CPU): FSDP2 sharding,
    its gathered-weights rollout and one update, with the tiny model."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += _SCRIPTS["ppo_script"] + ["--fsdp", "on", "--lora-rank", "0", "--total-iterations", "1"]
    return _run_script(ctx, "fsdp_step", [c.replace("{models}", _tiny_models(ctx)) for c in cmd])


def part_maniskill_gpu(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"status": "skipped", "reason": "physx_cuda needs a CUDA GPU"}
    from common.envs.maniskill import ManiSkillVLAEnv

    num_envs, steps = 64, 50
    t = time.perf_counter()
    env = ManiSkillVLAEnv("PushCube-v1", num_envs, image_size=224, sim_backend="gpu", max_episode_steps=steps)
    try:
        env.reset(list(range(num_envs)))
        build_s = time.perf_counter() - t
        actions = torch.zeros(num_envs, 7)
        t = time.perf_counter()
        for _ in range(steps):
            obs, *_ = env.step(actions)
        step_s = time.perf_counter() - t
        assert obs["rgb"].shape == (num_envs, 224, 224, 3)
    finally:
        env.close()
    return {"num_envs": num_envs, "build_and_reset_s": build_s, "env_steps_per_s": num_envs * steps / step_s}


def part_libero(ctx: Context) -> dict:
    import numpy as np

    from common.envs.libero import LiberoVectorEnv, configure_rendering, to_libero_actions

    backend = configure_rendering("egl" if ctx.cuda else None)
    num_envs, steps = (4, 64) if ctx.cuda else (1, 16)
    t = time.perf_counter()
    envs = LiberoVectorEnv(
        "libero_spatial", num_envs, max_steps=steps, use_workers=ctx.cuda, gpu_id=0 if ctx.cuda else -1
    )
    try:
        envs.reset([0] * num_envs, list(range(num_envs)), False)
        build_s = time.perf_counter() - t
        rng = np.random.default_rng(0)
        t, executed = time.perf_counter(), 0
        for _ in range(steps // 8):
            chunk = np.concatenate([rng.uniform(-0.3, 0.3, (num_envs, 8, 6)), rng.uniform(0, 1, (num_envs, 8, 1))], -1)
            executed += int(envs.step(to_libero_actions(chunk))[3].sum())
        steps_per_s = executed / (time.perf_counter() - t)
    finally:
        envs.close()
    return {"mujoco_gl": backend, "num_envs": num_envs, "build_and_reset_s": build_s, "env_steps_per_s": steps_per_s}


# Each script for 2 iterations with the tiny models and the README's quickstart flags ("{models}": their folder)
_SCRIPTS = {
    "ppo_script": [
        "ppo_openvla.py",
        "--model-path",
        "{models}/openvla",
        "--env-id",
        "PushCube-v1",
        "--num-envs",
        "2",
        "--num-steps",
        "16",
        "--max-episode-steps",
        "16",
        "--total-iterations",
        "2",
        "--num-minibatches",
        "2",
        "--micro-batch-size",
        "8",
        "--lora-rank",
        "8",
        "--eval-interval",
        "2",
        "--save-interval",
        "2",
    ],
    "grpo_script": [
        "grpo_internvl.py",
        "--model-path",
        "{models}/internvl",
        "--env-id",
        "PushCube-v1",
        "--num-envs",
        "4",
        "--group-size",
        "2",
        "--max-episode-steps",
        "16",
        "--total-iterations",
        "2",
        "--num-minibatches",
        "2",
        "--micro-batch-size",
        "16",
        "--lora-rank",
        "8",
        "--no-dynamic-sampling",
        "--eval-interval",
        "2",
        "--save-interval",
        "2",
    ],
    "srpo_script": [
        "srpo_openvla_oft.py",
        "--model-path",
        "{models}/openvla",
        "--world-model-path",
        "{models}/vjepa2",
        "--suite",
        "libero_spatial",
        "--task-ids",
        "0",
        "--num-envs",
        "2",
        "--group-size",
        "2",
        "--tasks-per-iteration",
        "1",
        "--no-dynamic-sampling",
        "--max-episode-steps",
        "32",
        "--lora-rank",
        "8",
        "--total-iterations",
        "2",
        "--eval-interval",
        "2",
        "--eval-init-states",
        "2",
        "--save-interval",
        "2",
    ],
}


def _tiny_models(ctx: Context) -> str:
    """The tiny OpenVLA, InternVL and V-JEPA 2 checkpoints the script parts run, written once."""
    models = os.path.join(ctx.tmp, "tiny-models")
    for kind in ("openvla", "internvl", "vjepa2"):
        if not os.path.isdir(os.path.join(models, kind)):
            cmd = [sys.executable, "-m", "common.models.tiny", kind, os.path.join(models, kind)]
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=120)
    return models


def _script_part(name: str):
    def part(ctx: Context) -> dict:
        models = _tiny_models(ctx)
        cmd = [sys.executable] + [c.replace("{models}", models) for c in _SCRIPTS[name]]
        return _run_script(ctx, name, cmd)

    part.__doc__ = f"{_SCRIPTS[name][0]} for 2 iterations with the tiny models."
    return part


part_ppo_script, part_grpo_script, part_srpo_script = (_script_part(n) for n in _SCRIPTS)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
class PartTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PartTimeout()


def run_part(name: str, ctx: Context) -> dict:
    """One part, stopped after --part-timeout-s (SIGALRM; a subprocess part gets the same limit)."""
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ctx.args.part_timeout_s)
    try:
        result = globals()[f"part_{name}"](ctx)
        result.setdefault("status", "ok")
    except PartTimeout:
        result = {"status": "timeout", "error": f"stopped after --part-timeout-s {ctx.args.part_timeout_s} s"}
    except Exception as e:  # one failing part must not stop the others
        result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        signal.alarm(0)
    result["part_s"] = time.perf_counter() - start
    if ctx.cuda:
        torch.cuda.empty_cache()
    return result


def write_json(path: str, results: dict) -> None:
    """Atomically (a killed run leaves the previous complete file, never half of one)."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _flatten(prefix: str, value, rows: list) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in ("traceback", "tail"):
                _flatten(f"{prefix}.{k}" if prefix else k, v, rows)
    else:
        rows.append((prefix, value))


def print_table(results: dict) -> None:
    rows = []
    for name, result in results["parts"].items():
        _flatten(name, result, rows)
    width = max(len(k) for k, _ in rows)
    print(f"\n{'metric':<{width}}  value")
    for key, value in rows:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["7b", "tiny"], default="7b", help="7b: real shapes on the GPU; tiny: CPU")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON results")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--rollout-batch-sizes", type=int, nargs="+", default=None, help="default 16 64 (tiny: 2 4)")
    parser.add_argument("--decode-batch-sizes", type=int, nargs="+", default=None, help="default 64 (tiny: 4)")
    parser.add_argument("--micro-batch", type=int, default=None, help="update micro-batch; default 8 (tiny: 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed repeats per measurement; default 5 (tiny: 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--oft-batch-sizes", type=int, nargs="+", default=None, help="default 16 32 64 (tiny: 2)")
    parser.add_argument("--video-batch", type=int, default=None, help="V-JEPA 2 clips per call; default 8 (tiny: 2)")
    parser.add_argument("--part-timeout-s", type=int, default=120, help="each part is stopped after this long")
    args = parser.parse_args(argv)
    import peft
    import timm
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        parser.error(f"transformers {transformers.__version__} is installed; the project needs 5.x (bench/README.md)")
    tiny = args.size == "tiny"
    args.rollout_batch_sizes = args.rollout_batch_sizes or ([2, 4] if tiny else [16, 64])
    args.decode_batch_sizes = args.decode_batch_sizes or ([4] if tiny else [64])
    args.micro_batch = args.micro_batch or (2 if tiny else 8)
    args.iters = args.iters or (1 if tiny else 5)
    args.oft_batch_sizes = args.oft_batch_sizes or ([2] if tiny else [16, 32, 64])
    args.video_batch = args.video_batch or (2 if tiny else 8)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, tmp)
        results = {
            "size": args.size,
            "device": torch.cuda.get_device_name() if ctx.cuda else "cpu",
            "torch": torch.__version__,
            "versions": {m.__name__: m.__version__ for m in (transformers, peft, timm)},
            "parts": {},
        }
        for name in args.parts:
            print(f"[gpu_check] {name} ...", flush=True)
            results["parts"][name] = result = run_part(name, ctx)
            write_json(args.out, results)  # after every part: a run killed at its wall-clock limit keeps these
            if result["status"] != "ok":
                why = result.get("reason") or result.get("error")
                print(f"[gpu_check] {name}: {result['status']}: {why}", flush=True)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
