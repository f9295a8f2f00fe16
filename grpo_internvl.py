"""GRPO fine-tuning of an InternVL vision-language model into a ManiSkill3 robot policy that writes its actions as text.

Every control step the policy sees the camera image and a prompt (task instruction + end-effector
state) and answers through a fixed template,

    action: {x: -18mm, y: -35mm, z: -28mm, roll: 0 degrees, pitch: 0 degrees, yaw: 4 degrees, open: 1}

under prefix-constrained decoding: template tokens are forced, sign slots allow only {" ", " -"},
number slots only the integers 0..999, so every answer parses. `group_size` episodes start from the
same initial state; the outcome reward 5 x success is normalised within the group (GRPO) and
broadcast to every sampled token of the episode; a token-mean clipped loss (clip 0.2 / 0.28) updates
LoRA adapters (or the whole model).

Anchor: the verl fork of SPEC 3.2 (defaults of SimpleVLA-RL / siiRL: temperature 1.6, lr 5e-6,
grad clip 1, 8 rollouts per initial state, dynamic sampling [0.1, 0.9], no KL) on PushCube-v1,
RGB, pd_ee_delta_pose, sparse reward, 75 steps.

Departures from the anchor:
- The training log-prob uses exactly the distribution that was sampled from: the same allowed-token
  mask, temperature and top-k/top-p. Top-k/top-p is applied at rollout time and the kept support is
  stored, so training renormalises the current policy on that same support (the ratio is exactly 1
  before the first update; the fork samples with top-k 20 / top-p 0.7 and trains without them).
- Numbers are written the tokenizer's own way: one token per integer when "0".."999" are single
  tokens (Llama-3 / GPT-4 style vocabularies), else three zero-padded digit tokens ("018") for
  tokenizers that split digits (Qwen2/Qwen2.5, i.e. the InternVL3 -hf checkpoints).
- Millimetres and degrees become metres and radians (/1000, /57.3), are clipped to the Panda
  pd_ee_delta_pose range (0.1 m, 0.1 rad) and normalised to the env's [-1, 1] action space.
- The token-mean runs over the global minibatch of all ranks: each rank's summed loss is divided by the
  global token count and gradients are summed across ranks by hand (not DDP), so ranks with different
  numbers of kept samples stay in step.
- Steps after an episode ended (success terminates PushCube) are neither generated nor trained on.

Run:
    python grpo_internvl.py --model-path OpenGVLab/InternVL3-1B-hf --env-id PushCube-v1 --num-envs 64
    torchrun --nproc-per-node 8 grpo_internvl.py --model-path OpenGVLab/InternVL3-1B-hf --env-id PushCube-v1
    python grpo_internvl.py --resume runs/grpo_internvl__s1/checkpoints
    python grpo_internvl.py --eval-only --checkpoint runs/grpo_internvl__s1/checkpoints --capture-video
CPU quickstart (tiny random InternVL from `python -m common.internvl_tiny`, real simulator): see README.md.
"""

import copy
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import tyro
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoProcessor, DynamicCache, InternVLForConditionalGeneration

from common.checkpoint import load_trainer_state, resolve_checkpoint, save_checkpoint, save_trainer_state, trainer_state
from common.dist import (all_reduce_mean, all_reduce_sum_, broadcast_parameters, check_in_sync, cleanup, init_dist, print0,
                         sum_gradients_)
from common.logger import Logger
from common.maniskill_env import ManiSkillVLAEnv, check_env_id, check_render_device


@dataclass
class Args:
    exp_name: str = "grpo_internvl"
    """name of the run; logs and checkpoints go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds torch (per rank and iteration) and the env reset seeds"""
    model_path: str = "OpenGVLab/InternVL3-1B-hf"
    """hub id or local folder of a transformers-native InternVL checkpoint (the `-hf` ones)"""
    env_id: str = "PushCube-v1"
    """ManiSkill3 task id"""
    instruction: Optional[str] = None
    """task instruction written into the prompt (default: the task's own)"""
    num_envs: int = 64
    """parallel envs per rank = episodes per iteration per rank; a multiple of group_size"""
    group_size: int = 8
    """episodes per initial state (one GRPO group); at least 2"""
    max_episode_steps: int = 75
    """control steps per episode"""
    image_size: int = 224
    """camera resolution (square); the processor resizes it to the model's input size"""
    total_iterations: int = 200
    """training iterations (one batch of episodes and one update each)"""

    reward_coef: float = 5.0
    """outcome reward = reward_coef x success at the end of the episode"""
    temperature: float = 1.6
    """sampling temperature of training rollouts"""
    top_k: int = 0
    """sample only among the k most likely allowed tokens (0: off)"""
    top_p: float = 1.0
    """sample only from the smallest allowed set with probability >= top_p (1.0: off)"""
    clip_low: float = 0.2
    """ratio clipped below at 1 - clip_low"""
    clip_high: float = 0.28
    """ratio clipped above at 1 + clip_high"""
    dynamic_sampling: bool = True
    """drop groups whose success rate lies outside success_bounds (they carry no signal)"""
    success_bounds: tuple[float, float] = (0.1, 0.9)
    """kept groups have lower <= success rate <= upper"""
    kl_coef: float = 0.0
    """weight of the k3 KL to the frozen initial policy (the reference is built only when > 0)"""
    update_epochs: int = 1
    """passes over the collected steps per iteration"""
    num_minibatches: int = 4
    """optimizer steps per epoch; each rank splits its steps into this many minibatches"""
    micro_batch_size: int = 16
    """steps per forward/backward (gradient accumulation inside a minibatch)"""
    learning_rate: float = 5e-6
    """AdamW learning rate"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""

    lora_rank: int = 32
    """LoRA rank on the language model's linear layers; 0 trains the full model"""
    lora_alpha: int = 64
    """LoRA scaling numerator (scale = alpha / rank)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (saves memory, costs ~30% time)"""

    eval_interval: int = 10
    """evaluate every this many iterations (0: never)"""
    eval_temperature: float = 0.0
    """temperature of evaluation (0: greedy over the allowed tokens)"""
    capture_video: bool = False
    """write an mp4 of the first eval env to {run}/videos/"""
    save_interval: int = 10
    """write a checkpoint every this many iterations (0: only at the end)"""
    keep_checkpoints: int = 3
    """keep only the newest this many checkpoints (0: all)"""
    resume: Optional[str] = None
    """checkpoint step folder, or a checkpoints root with a `latest` pointer, to continue training from"""
    eval_only: bool = False
    """only evaluate (the base model, or --checkpoint) and exit"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only (its model path and LoRA settings are used)"""

    # derived from the flags above in validate()
    num_groups: tyro.conf.Suppress[int] = 0
    """GRPO groups (initial states) per rank per iteration (num_envs / group_size)"""
    global_episodes: tyro.conf.Suppress[int] = 0
    """episodes per iteration over all ranks (num_envs x world size)"""


def validate(args: Args, world_size: int):
    """Every check that can fail on user input, before envs or weights are loaded. Returns (processor, template)."""
    if args.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 (GRPO normalises within a group), got {args.group_size}")
    if args.num_envs % args.group_size:
        raise ValueError(f"--num-envs ({args.num_envs}) must be a multiple of --group-size ({args.group_size})")
    args.num_groups = args.num_envs // args.group_size
    args.global_episodes = args.num_envs * world_size
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 for training rollouts, got {args.temperature}")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError(f"--top-p must be in (0, 1] and --top-k >= 0, got {args.top_p}, {args.top_k}")
    if not 0 <= args.success_bounds[0] <= args.success_bounds[1] <= 1:
        raise ValueError(f"--success-bounds must satisfy 0 <= lower <= upper <= 1, got {args.success_bounds}")
    if min(args.num_minibatches, args.micro_batch_size, args.update_epochs, args.max_episode_steps) < 1:
        raise ValueError("--num-minibatches, --micro-batch-size, --update-epochs, --max-episode-steps must be >= 1")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.image_size < 32:
        raise ValueError(f"--image-size must be at least 32 (pixels per side), got {args.image_size}")
    if args.eval_only and args.resume:
        raise ValueError("--eval-only evaluates --checkpoint; do not combine it with --resume")
    if args.checkpoint and not args.eval_only:
        raise ValueError("--checkpoint is for --eval-only; use --resume to continue training")
    if args.resume:
        args.resume = resolve_checkpoint(args.resume, "--resume")
    if args.checkpoint:
        args.checkpoint = resolve_checkpoint(args.checkpoint, "--checkpoint")
        saved = load_trainer_state(args.checkpoint)["args"]  # evaluate the model the checkpoint was trained from
        for key in ("model_path", "lora_rank", "lora_alpha"):
            setattr(args, key, saved[key])
    check_env_id(args.env_id)
    check_render_device()
    return load_processor_and_template(args.model_path)


# ===================================================================================== action text
MM_PER_M, DEG_PER_RAD = 1000.0, 57.3
EE_POS_LIMIT_M, EE_ROT_LIMIT_RAD = 0.1, 0.1  # Panda pd_ee_delta_pose bounds (ManiSkill3), normalised to [-1, 1]
POSE_FIELDS = (("x", "mm"), ("y", "mm"), ("z", "mm"), ("roll", " degrees"), ("pitch", " degrees"), ("yaw", " degrees"))


class ActionTemplate:
    """The action answer compiled for one tokenizer: forced token runs between free slots.

    Free slots are sign slots {" ", " -"}, number slots (one token "0".."999", or three digit tokens
    "0".."9" for tokenizers that split digits) and the gripper slot {"0", "1"}. A sampled free token
    is stored as its index in the slot's allowed set, so decoding the action is arithmetic on indices.
    """

    def __init__(self, tokenizer):
        def one_token(text: str) -> int:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1 or tokenizer.decode(ids) != text:
                raise ValueError(
                    f"--model-path: the tokenizer cannot express the action template: {text!r} is not one token "
                    f"(got {tokenizer.convert_ids_to_tokens(ids)})"
                )
            return ids[0]

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        sign = [one_token(" "), one_token(" -")]
        digits = [one_token(str(d)) for d in range(10)]
        if all(len(encode(str(n))) == 1 for n in range(1000)):
            self.digits_per_number, number = 1, [one_token(str(n)) for n in range(1000)]
        elif all(encode(f"{n:03d}") == [digits[int(c)] for c in f"{n:03d}"] for n in range(1000)):
            self.digits_per_number, number = 3, digits
        else:
            raise ValueError(
                "--model-path: the tokenizer cannot express the action template: integers 0..999 are neither "
                "single tokens nor sequences of single-digit tokens"
            )
        # Allowed sets, padded to a common width S: 0 sign, 1 number (or digit), 2 gripper.
        sets = [sign, number, digits[:2]]
        width = max(len(s) for s in sets)
        self.set_ids = torch.tensor([s + [s[0]] * (width - len(s)) for s in sets])  # (3, S)
        self.set_valid = torch.tensor([[i < len(s) for i in range(width)] for s in sets])  # (3, S)

        # Forced text between slots: "action: {x:" [sign][number] "mm, y:" ... " degrees, open: " [gripper] "}"
        texts, slots = [], []
        prefix = "action: {"
        for name, unit in POSE_FIELDS:
            texts += [prefix + f"{name}:"] + [""] * self.digits_per_number
            slots += [0] + [1] * self.digits_per_number
            prefix = f"{unit}, "
        texts += [prefix + "open: "]
        slots += [2]
        texts += ["}"]
        self.forced = [encode(t) for t in texts]  # forced[f] comes right before free slot f; forced[-1] is the tail
        self.free_set = torch.tensor(slots)  # (F,) allowed-set index of each free slot
        self.num_free = len(slots)
        lengths = [len(ids) + 1 for ids in self.forced[:-1]]  # each forced run is followed by its free token
        self.free_pos = torch.tensor(np.cumsum(lengths) - 1)  # (F,) position of each free token in the answer
        self.answer_len = sum(lengths) + len(self.forced[-1])

    def assemble(self, free_tokens: torch.Tensor) -> torch.Tensor:
        """free token ids (B, F) -> full answer ids (B, A) with the forced tokens in place."""
        batch = free_tokens.size(0)
        pieces = []
        for f in range(self.num_free):
            pieces += [torch.tensor(self.forced[f], dtype=torch.long).expand(batch, -1), free_tokens[:, f : f + 1]]
        pieces.append(torch.tensor(self.forced[-1], dtype=torch.long).expand(batch, -1))
        return torch.cat(pieces, dim=1)

    def to_env_action(self, choices: torch.Tensor) -> torch.Tensor:
        """Indices of the sampled tokens in their allowed sets (B, F) -> normalised pd_ee_delta_pose (B, 7)."""
        per_field = 1 + self.digits_per_number
        pose = choices[:, : 6 * per_field].view(-1, 6, per_field)  # (B, 6, sign + digits)
        place = 10 ** torch.arange(self.digits_per_number - 1, -1, -1)  # (D,) 100, 10, 1 or just 1
        magnitude = (pose[:, :, 1:] * place).sum(-1).float()  # (B, 6) in mm / degrees
        value = torch.where(pose[:, :, 0] == 1, -magnitude, magnitude)
        pos = (value[:, :3] / MM_PER_M).clamp(-EE_POS_LIMIT_M, EE_POS_LIMIT_M) / EE_POS_LIMIT_M
        rot = (value[:, 3:] / DEG_PER_RAD).clamp(-EE_ROT_LIMIT_RAD, EE_ROT_LIMIT_RAD) / EE_ROT_LIMIT_RAD
        gripper = torch.where(choices[:, -1:] == 1, 1.0, -1.0)  # open: 1 -> +1 (open), 0 -> -1 (close)
        return torch.cat([pos, rot, gripper], dim=1)


ACTION_PATTERN = re.compile(
    r"action: \{x: (-?\d+)mm, y: (-?\d+)mm, z: (-?\d+)mm, roll: (-?\d+) degrees, "
    r"pitch: (-?\d+) degrees, yaw: (-?\d+) degrees, open: ([01])\}"
)


def parse_action_text(text: str) -> torch.Tensor:
    """Answer text -> normalised pd_ee_delta_pose (7,); the reference decoder the tests compare against."""
    match = ACTION_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"not an action: {text!r}")
    v = [float(g) for g in match.groups()]
    pos = [max(-EE_POS_LIMIT_M, min(EE_POS_LIMIT_M, x / MM_PER_M)) / EE_POS_LIMIT_M for x in v[:3]]
    rot = [max(-EE_ROT_LIMIT_RAD, min(EE_ROT_LIMIT_RAD, x / DEG_PER_RAD)) / EE_ROT_LIMIT_RAD for x in v[3:6]]
    return torch.tensor(pos + rot + [1.0 if v[6] > 0.5 else -1.0])


# ===================================================================================== prompts
def state_text(tcp_pose: torch.Tensor) -> str:
    """End-effector pose (7,) xyz + quaternion wxyz -> text in the action's units (mm, degrees)."""
    x, y, z, qw, qx, qy, qz = tcp_pose.tolist()
    roll = math.atan2(2 * (qw * qx + qy * qz), 1 - 2 * (qx * qx + qy * qy))
    pitch = math.asin(max(-1.0, min(1.0, 2 * (qw * qy - qz * qx))))
    yaw = math.atan2(2 * (qw * qz + qx * qy), 1 - 2 * (qy * qy + qz * qz))
    values = [v * MM_PER_M for v in (x, y, z)] + [v * DEG_PER_RAD for v in (roll, pitch, yaw)]
    return ", ".join(f"{name}: {round(v)}{unit}" for (name, unit), v in zip(POSE_FIELDS, values))


def build_inputs(processor, instructions: list[str], rgb: torch.Tensor, tcp_pose: torch.Tensor, device):
    """rgb (B, H, W, 3) uint8, tcp_pose (B, 7) -> model inputs (left-padded ids, mask, pixel_values)."""
    prompts = []
    for instruction, pose in zip(instructions, tcp_pose):
        text = f"{instruction}\nEnd-effector state: {{{state_text(pose)}}}\nWhat action should the robot take?"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    inputs = processor(
        text=prompts, images=list(rgb.permute(0, 3, 1, 2)), crop_to_patches=False, padding=True, return_tensors="pt"
    )
    return inputs.to(device)


# ===================================================================================== ALGO LOGIC: the sampling distribution
def sampling_support(scores: torch.Tensor, valid: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Allowed tokens that survive top-k then top-p of softmax(scores): bool, same shape as scores (..., S)."""
    scores = scores.masked_fill(~valid, -math.inf)
    keep = valid.clone()
    if top_k > 0 and top_k < scores.size(-1):
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        keep &= scores >= kth
    if top_p < 1.0:
        probs = scores.masked_fill(~keep, -math.inf).softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # keep the smallest prefix reaching top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, mass_before < top_p)
    return keep


def policy_logprobs(logits: torch.Tensor, support: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) over the allowed-set logits (..., S): softmax(logits / T) renormalised on `support`."""
    return (logits.float() / temperature).masked_fill(~support, -math.inf).log_softmax(-1)
# ===================================================================================== end ALGO LOGIC


class Sampled(NamedTuple):
    choices: torch.Tensor  # (B, F) index of each free token in its slot's allowed set
    tokens: torch.Tensor  # (B, F) vocabulary ids of the free tokens
    logp: torch.Tensor  # (B, F) log-prob of each free token under the sampling distribution
    support: torch.Tensor  # (B, F, S) allowed tokens kept by top-k/top-p: the support sampled from
    entropy: torch.Tensor  # (B, F) entropy of the sampling distribution


@torch.no_grad()
def generate_actions(model, inputs, template: ActionTemplate, temperature: float, top_k: int, top_p: float) -> Sampled:
    """Prefix-constrained sampling, batched with the KV cache. temperature 0 is greedy (eval).

    One forward per free slot: it feeds the previously sampled token plus the forced run before the
    slot (the prefill also carries the prompt and the first forced run), then samples the slot.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, device = ids.size(0), ids.device
    set_ids, set_valid = template.set_ids.to(device), template.set_valid.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    cache = DynamicCache()
    step_ids, step_pos = ids, positions
    choices, tokens, logps, supports, entropies = [], [], [], [], []
    for f in range(template.num_free):
        forced = torch.tensor(template.forced[f], dtype=torch.long, device=device).expand(batch, -1)
        step_ids = torch.cat([step_ids, forced], dim=1)
        step_pos = torch.cat([step_pos, step_pos[:, -1:] + 1 + torch.arange(forced.size(1), device=device)], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, forced.size(1) + (f > 0))], dim=1)
        out = model(
            input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache, use_cache=True,
            pixel_values=inputs["pixel_values"] if f == 0 else None, logits_to_keep=1,
        )
        k = template.free_set[f]
        logits = out.logits[:, -1, set_ids[k]]  # (B, S) logits of the slot's allowed tokens
        valid = set_valid[k].expand(batch, -1)
        if temperature > 0:
            support = sampling_support(logits.float() / temperature, valid, top_k, top_p)
            logp = policy_logprobs(logits, support, temperature)  # (B, S)
            choice = torch.multinomial(logp.exp(), 1).squeeze(1)  # (B,)
        else:
            support = valid
            logp = policy_logprobs(logits, support, 1.0)
            choice = logits.float().masked_fill(~valid, -math.inf).argmax(-1)
        token = set_ids[k][choice]
        choices.append(choice)
        tokens.append(token)
        logps.append(logp.gather(1, choice[:, None]).squeeze(1))
        supports.append(support)
        entropies.append(torch.special.entr(logp.exp()).sum(-1))
        step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
    return Sampled(*(torch.stack(x, 1) for x in (choices, tokens, logps, supports, entropies)))


def free_slot_logits(model, inputs, answer_ids: torch.Tensor, template: ActionTemplate) -> torch.Tensor:
    """One teacher-forced forward over prompt + answer -> logits of the allowed sets at the free slots (B, F, S)."""
    last_free = int(template.free_pos[-1])
    ids = torch.cat([inputs["input_ids"], answer_ids[:, :last_free]], dim=1)  # the last free token is never an input
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(ids.size(0), last_free)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = inputs["input_ids"].size(1) - 1 + template.free_pos.to(ids.device)  # (F,) positions predicting the free tokens
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=inputs["pixel_values"],
                use_cache=False, logits_to_keep=rows)
    slot_ids = template.set_ids.to(ids.device)[template.free_set.to(ids.device)]  # (F, S)
    return out.logits.gather(2, slot_ids.expand(ids.size(0), -1, -1))  # (B, F, S)


# ===================================================================================== ALGO LOGIC: GRPO
def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N,) of N // group_size consecutive groups -> A = (R - mean_group) / (std_group + 1e-6), (N,)."""
    grouped = rewards.view(-1, group_size)  # (groups, G)
    if group_size == 1:
        return rewards.clone()  # a group of one has no baseline: A = R
    advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, unbiased=True, keepdim=True) + 1e-6)
    return advantages.view(-1)


def groups_kept(success: torch.Tensor, group_size: int, low: float, high: float) -> torch.Tensor:
    """Dynamic sampling: keep groups whose success mean lies in [low, high]; bool (N,) per episode."""
    group_mean = success.float().view(-1, group_size).mean(1)  # (groups,)
    keep = (group_mean >= low) & (group_mean <= high)
    return keep.repeat_interleave(group_size)


def grpo_loss(logp, old_logp, advantages, ref_logp, clip_low: float, clip_high: float, kl_coef: float):
    """Token-level clipped loss over free tokens. logp, old_logp, ref_logp (B, F); advantages (B,).

    Returns the per-token loss (B, F) (the caller sums and divides by the global token count) and stats.
    """
    logratio = logp - old_logp
    ratio = logratio.exp()
    adv = advantages[:, None]  # broadcast the episode's advantage to its tokens
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.max(pg_loss1, pg_loss2)
    stats = {"pg_loss": loss.detach()}
    if kl_coef > 0:
        ref_logratio = ref_logp - logp
        kl = ref_logratio.exp() - ref_logratio - 1  # k3 estimator of KL(pi || pi_ref)
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    with torch.no_grad():
        stats["approx_kl"] = (ratio - 1) - logratio  # k3 of KL(pi_old || pi)
        stats["clipfrac"] = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float()
        stats["ratio"] = ratio
    return loss, stats
# ===================================================================================== end ALGO LOGIC


# ===================================================================================== model
def load_processor_and_template(model_path: str):
    """Read only the config and tokenizer files: fail fast on a checkpoint that is not InternVL."""
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--model-path {model_path!r} is not a transformers-native checkpoint (use an InternVL `-hf` one, e.g. "
            f"OpenGVLab/InternVL3-1B-hf): {e}"
        ) from e
    if config.model_type != "internvl":
        raise ValueError(
            f"--model-path {model_path!r} has model_type {config.model_type!r}, not 'internvl': use a "
            "transformers-native InternVL checkpoint, e.g. OpenGVLab/InternVL3-1B-hf"
        )
    processor = AutoProcessor.from_pretrained(model_path)
    return processor, ActionTemplate(processor.tokenizer)


def load_policy(args: Args, device: torch.device, checkpoint_dir: Optional[str]):
    """InternVL with LoRA adapters or fully trainable; flash-attention 2 when installed, else SDPA.

    On GPU everything runs under bf16 autocast; the frozen base of a LoRA model is stored in bf16 (peft keeps the
    adapters in fp32), fully trained weights stay fp32 so that lr 5e-6 updates are not rounded away.
    """
    attn = "sdpa"
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    full_weights = checkpoint_dir if checkpoint_dir and args.lora_rank == 0 else args.model_path
    dtype = torch.bfloat16 if device.type == "cuda" and args.lora_rank > 0 else torch.float32
    model = InternVLForConditionalGeneration.from_pretrained(full_weights, dtype=dtype, attn_implementation=attn)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank > 0:
        if checkpoint_dir:
            if not os.path.exists(os.path.join(checkpoint_dir, "adapter_config.json")):
                raise ValueError(f"{checkpoint_dir} holds no LoRA adapter: was it trained with --lora-rank 0?")
            model = PeftModel.from_pretrained(model, checkpoint_dir, is_trainable=True)
        else:
            lora = LoraConfig(
                r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            )
            model = get_peft_model(model, lora)
    return model.to(device)


@torch.no_grad()
def reference_logits(model, reference, inputs, answer_ids, template):
    """Logits of the frozen initial policy: LoRA with its adapters switched off, or a frozen copy."""
    if reference is None:
        with model.disable_adapter():
            return free_slot_logits(model, inputs, answer_ids, template)
    return free_slot_logits(reference, inputs, answer_ids, template)


def update_policy(model, reference, optimizer, processor, template, ep, step_idx, env_idx, advantages, args, device,
                  autocast):
    """PPO-style epochs over the kept steps (step_idx, env_idx) (M,) of the rollout `ep`; returns actor/* metrics.

    Each minibatch is one optimizer step; micro-batches accumulate loss_sum / (free tokens of the minibatch
    over all ranks), and gradients are summed over ranks, which gives the exact global token-mean.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    stats: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.update_epochs):
        order = torch.randperm(len(step_idx))
        for minibatch in order.tensor_split(args.num_minibatches):
            global_tokens = all_reduce_sum_(torch.tensor(float(len(minibatch) * template.num_free), device=device))
            if global_tokens.item() == 0:
                continue
            for micro in minibatch.split(args.micro_batch_size):
                t, n = step_idx[micro], env_idx[micro]
                instructions = [ep["instructions"][i] for i in n]
                inputs = build_inputs(processor, instructions, ep["rgb"][t, n], ep["tcp_pose"][t, n], device)
                answer_ids = template.assemble(ep["tokens"][t, n]).to(device)
                support = ep["support"][t, n].to(device)  # (b, F, S) the rollout's sampling support
                choice = ep["choices"][t, n].to(device)[..., None]  # (b, F, 1)
                with autocast:
                    logits = free_slot_logits(model, inputs, answer_ids, template)
                    ref_logp = None
                    if args.kl_coef > 0:
                        ref = reference_logits(model, reference, inputs, answer_ids, template)
                        ref_logp = policy_logprobs(ref, support, args.temperature).gather(2, choice).squeeze(2)
                # ALGO LOGIC: the log-prob under the same mask, temperature and top-k/top-p support as the rollout
                logp = policy_logprobs(logits, support, args.temperature).gather(2, choice).squeeze(2)  # (b, F)
                loss, micro_stats = grpo_loss(logp, ep["logp"][t, n].to(device), advantages[n].to(device), ref_logp,
                                              args.clip_low, args.clip_high, args.kl_coef)
                (loss.sum() / global_tokens).backward()
                for key, value in micro_stats.items():
                    stats.setdefault(key, []).append(value.flatten().cpu())
            sum_gradients_(params)  # each rank's loss is already divided by the global token count
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            stats.setdefault("grad_norm", []).append(grad_norm.detach().flatten().cpu())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # Token-weighted means over all ranks (a rank may have had no kept samples).
    keys = ["pg_loss", "approx_kl", "clipfrac", "ratio", "grad_norm"] + (["kl"] if args.kl_coef > 0 else [])
    totals = torch.tensor(
        [[torch.cat(stats[k]).sum().item(), sum(v.numel() for v in stats[k])] if k in stats else [0.0, 0.0] for k in keys],
        dtype=torch.float64, device=device,
    )
    all_reduce_sum_(totals)
    return {f"actor/{k}": total / count for k, (total, count) in zip(keys, totals.tolist()) if count > 0}


# ===================================================================================== rollout
def run_episodes(envs, model, processor, template, seeds, temperature, top_k, top_p, device, autocast, video=False):
    """One episode per env from the given reset seeds. Steps of finished episodes are skipped.

    Returns a dict of (T, N, ...) tensors on CPU: rgb, tcp_pose, choices, tokens, logp, entropy, support, alive,
    plus success (N,), length (N,), the video frames of env 0 and the number of generated tokens.
    """
    T, N = envs.max_episode_steps, envs.num_envs
    F, S = template.num_free, template.set_ids.size(1)
    obs = envs.reset(seeds)
    H, W = obs["rgb"].shape[1:3]
    rgb = torch.zeros(T, N, H, W, 3, dtype=torch.uint8)
    tcp_pose = torch.zeros(T, N, 7)
    choices = torch.zeros(T, N, F, dtype=torch.long)
    tokens = torch.zeros(T, N, F, dtype=torch.long)
    logp = torch.zeros(T, N, F)
    entropy = torch.zeros(T, N, F)
    support = torch.zeros(T, N, F, S, dtype=torch.bool)
    alive = torch.zeros(T, N, dtype=torch.bool)  # step t of env n belongs to its first episode
    running = torch.ones(N, dtype=torch.bool)
    success = torch.zeros(N, dtype=torch.bool)
    length = torch.full((N,), T)
    frames = [obs["rgb"][0]] if video else []
    for t in range(T):
        rgb[t], tcp_pose[t], alive[t] = obs["rgb"], obs["tcp_pose"], running
        idx = running.nonzero().squeeze(1)
        inputs = build_inputs(processor, [envs.instructions[i] for i in idx], obs["rgb"][idx], obs["tcp_pose"][idx], device)
        with autocast:
            sampled = generate_actions(model, inputs, template, temperature, top_k, top_p)
        choices[t, idx], tokens[t, idx], logp[t, idx] = sampled.choices.cpu(), sampled.tokens.cpu(), sampled.logp.cpu()
        support[t, idx], entropy[t, idx] = sampled.support.cpu(), sampled.entropy.cpu()
        actions = torch.zeros(N, 7)
        actions[idx] = template.to_env_action(choices[t, idx])
        obs, _, terminated, truncated, info = envs.step(actions)
        done = (terminated | truncated) & running
        success |= done & info["success"]
        length[done] = t + 1
        running &= ~done
        if video and alive[t, 0]:
            frames.append(info["final_obs"]["rgb"][0] if done[0] else obs["rgb"][0])
        if not running.any():
            break
    return dict(
        instructions=envs.instructions, rgb=rgb, tcp_pose=tcp_pose, choices=choices, tokens=tokens, logp=logp,
        entropy=entropy, support=support, alive=alive, success=success, length=length, frames=frames,
        tokens_generated=int(alive.sum()) * template.answer_len,
    )


def evaluate(envs, model, processor, template, args, dist, device, autocast):
    """Held-out initial states (seeds >= 2**31, never used in training), greedy unless --eval-temperature."""
    seeds = [2**31 + dist.rank * envs.num_envs + i for i in range(envs.num_envs)]  # the same set for every run
    model.eval()
    ep = run_episodes(envs, model, processor, template, seeds, args.eval_temperature, 0, 1.0, device, autocast,
                      video=args.capture_video and dist.is_main)
    metrics = all_reduce_mean({"eval/success_rate": ep["success"].float().mean().item(),
                               "eval/episode_length": ep["length"].float().mean().item()})
    return metrics, ep["frames"]


def main(args: Args) -> None:
    dist = init_dist()
    processor, template = validate(args, dist.world_size)
    checkpoint_dir = args.resume or args.checkpoint

    # ---------------------------------------------------------------- seeding, model, optimizer
    device = dist.device
    torch.manual_seed(args.seed)  # identical initial LoRA weights on every rank (and broadcast below)
    model = load_policy(args, device, checkpoint_dir)
    broadcast_parameters(model)
    reference = None
    if args.kl_coef > 0 and args.lora_rank == 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    start_iteration = 0
    if checkpoint_dir:
        state = load_trainer_state(checkpoint_dir)
        start_iteration = state["step"]
        if args.resume:
            optimizer.load_state_dict(state["optimizer"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    envs = ManiSkillVLAEnv(args.env_id, args.num_envs, image_size=args.image_size,
                           instruction=args.instruction, max_episode_steps=args.max_episode_steps, reward_mode="sparse")
    run_path = os.path.join(args.run_dir, f"{args.exp_name}__s{args.seed}")
    logger = Logger(run_path, args, enabled=dist.is_main)
    print0(f"GRPO {args.env_id}: {dist.world_size} rank(s) x {args.num_envs} envs = {args.global_episodes} episodes per "
           f"iteration, {args.num_groups} groups of {args.group_size} per rank; {sum(p.numel() for p in params):,} "
           f"trainable parameters; {template.num_free} free tokens per action")

    if args.eval_only:
        metrics, frames = evaluate(envs, model, processor, template, args, dist, device, autocast)
        logger.log(metrics, start_iteration)
        if frames:
            logger.video("eval/video", torch.stack(frames).numpy(), start_iteration, fps=10)
        print0(json.dumps(metrics))
        envs.close()
        logger.close()
        cleanup()
        return

    def save(iteration: int) -> None:
        """LoRA adapter (or the full model) + processor + trainer state, written atomically by rank 0."""
        def write(tmp_dir: str) -> None:
            model.save_pretrained(tmp_dir)
            processor.save_pretrained(tmp_dir)
            save_trainer_state(tmp_dir, trainer_state(args, iteration, optimizer))

        check_in_sync(params)  # the hand-summed gradients keep ranks identical; verify before writing rank 0's copy
        if dist.is_main:
            path = save_checkpoint(os.path.join(run_path, "checkpoints"), iteration, write, keep_last=args.keep_checkpoints)
            print0(f"saved {path}")

    for iteration in range(start_iteration + 1, args.total_iterations + 1):
        t0 = time.time()
        # ---------------------------------------------------------------- 1. rollout: group_size episodes per seed
        # Sampling, shuffling and reset seeds derive from (seed, rank, iteration): a resume replays exactly.
        rng = np.random.default_rng([args.seed, dist.rank, iteration])
        torch.manual_seed(int(rng.integers(2**62)))
        group_seeds = rng.integers(0, 2**31, size=args.num_groups).tolist()
        seeds = [s for s in group_seeds for _ in range(args.group_size)]
        model.eval()
        ep = run_episodes(envs, model, processor, template, seeds, args.temperature, args.top_k, args.top_p, device,
                          autocast)
        rollout_time = time.time() - t0

        # ALGO LOGIC ------------------------------------------------------- 2. reward, 3. advantage
        rewards = args.reward_coef * ep["success"].float()  # (N,) outcome reward at the final step
        advantages = group_advantages(rewards, args.group_size)  # (N,)
        kept = (groups_kept(ep["success"], args.group_size, *args.success_bounds)
                if args.dynamic_sampling else torch.ones(args.num_envs, dtype=torch.bool))
        step_idx, env_idx = (ep["alive"] & kept[None, :]).nonzero(as_tuple=True)  # (M,) training samples
        # end ALGO LOGIC

        # ---------------------------------------------------------------- 4. update: epochs x minibatches
        t1 = time.time()
        update_metrics = update_policy(model, reference, optimizer, processor, template, ep, step_idx, env_idx,
                                       advantages, args, device, autocast)
        update_time = time.time() - t1

        # ---------------------------------------------------------------- 5. log, eval, save
        group_success = ep["success"].float().view(-1, args.group_size).mean(1)
        env_steps = int(ep["alive"].sum())
        metrics = {
            "rollout/reward_mean": rewards.mean().item(),
            "rollout/group_success_mean": group_success.mean().item(),
            "rollout/groups_kept_frac": kept.float().mean().item(),
            "rollout/groups_all_success_frac": (group_success == 1).float().mean().item(),
            "rollout/groups_all_fail_frac": (group_success == 0).float().mean().item(),
            "rollout/logp_per_token": ep["logp"][ep["alive"]].mean().item(),
            "rollout/entropy": ep["entropy"][ep["alive"]].mean().item(),
            "env/success_rate": ep["success"].float().mean().item(),
            "env/episode_length": ep["length"].float().mean().item(),
            "actor/samples": float(len(step_idx)),
            "actor/lr": optimizer.param_groups[0]["lr"],
            "time/rollout_s": rollout_time,
            "time/update_s": update_time,
            # throughput of all ranks together (x world size, then averaged over ranks)
            "time/env_steps_per_s": env_steps / rollout_time * dist.world_size,
            "time/decode_tokens_per_s": ep["tokens_generated"] / rollout_time * dist.world_size,
            "time/update_samples_per_s": len(step_idx) * args.update_epochs / max(update_time, 1e-9) * dist.world_size,
        }
        metrics.update(update_metrics)
        metrics = all_reduce_mean(metrics)
        if args.eval_interval and iteration % args.eval_interval == 0:
            eval_metrics, frames = evaluate(envs, model, processor, template, args, dist, device, autocast)
            metrics.update(eval_metrics)
            if frames:
                logger.video("eval/video", torch.stack(frames).numpy(), iteration, fps=10)
        metrics["time/iteration_s"] = time.time() - t0
        logger.log(metrics, iteration)
        print0(f"iter {iteration}: success {metrics['env/success_rate']:.3f}, kept groups "
               f"{metrics['rollout/groups_kept_frac']:.2f}, {metrics['time/iteration_s']:.1f}s"
               + (f", eval success {metrics['eval/success_rate']:.3f}" if "eval/success_rate" in metrics else ""))
        if (args.save_interval and iteration % args.save_interval == 0) or iteration == args.total_iterations:
            save(iteration)

    envs.close()
    logger.close()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
