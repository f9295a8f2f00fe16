"""GRPO fine-tuning of an InternVL vision-language model into a ManiSkill3 robot policy that writes its actions as text.

Every control step the policy sees the camera image and a prompt (task instruction + end-effector
state) and answers through a fixed template,

    action: {x: -18mm, y: -35mm, z: -28mm, roll: 0 degrees, pitch: 0 degrees, yaw: 4 degrees, open: 1}

under prefix-constrained decoding: template tokens are forced, sign slots allow only {" ", " -"},
number slots only the integers 0..999, so every answer parses. `group_size` episodes start from the
same initial state; the outcome reward 5 x success is normalised within the group (GRPO) and
broadcast to every sampled token of the episode; a token-mean clipped loss (clip 0.2 / 0.28; or every
episode weighted the same, --loss-agg-mode seq-mean-token-mean) updates LoRA adapters (or the whole model).

Anchor: the GRPO-on-InternVL verl fork with text actions (defaults of SimpleVLA-RL / siiRL: temperature 1.6, lr 5e-6,
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
CPU quickstart (tiny random InternVL from `python -m common.models.tiny internvl`, real simulator): see README.md.
The answer template and the prompt live in common/models/action_text.py, shared with the SFT script that warm-starts it.
Stopping: SIGTERM (Slurm, Kubernetes) or Ctrl-C finishes the current iteration, writes a checkpoint and exits 0;
continue with --resume. Give the job a grace period longer than one iteration plus a save (torchrun
--shutdown-timeout, Slurm --signal=TERM@N, Kubernetes terminationGracePeriodSeconds).
"""

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import tyro
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DynamicCache, InternVLForConditionalGeneration

from common import fsdp
from common.checkpoint import check_run_flags
from common.dist import (
    all_reduce_mean,
    all_reduce_sum_,
    attn_implementation,
    bf16_autocast,
    broadcast_parameters,
    init_dist,
    is_main_process,
    print0,
    sum_gradients_,
    world_size,
)
from common.envs.maniskill import (
    HELD_OUT_SEED_BASE,
    ManiSkillVLAEnv,
    check_env_id,
    check_render_device,
    held_out_seeds,
    obj_set_kwargs,
)
from common.evaluation import advance, gather_episodes, progress, success_metrics
from common.guards import NonFiniteGuard, check_finite_logits, check_flags
from common.logger import Logger, check_tracking, video_file
from common.models.action_text import ActionTemplate, build_inputs, load_processor_and_template
from common.run import RunShell, resume_training


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "grpo_internvl"
    """name of the run; logs and checkpoints go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds torch (per rank and iteration) and the env reset seeds"""
    # --- model ---
    model_path: str = "OpenGVLab/InternVL3-1B-hf"
    """hub id or local folder of a transformers-native InternVL checkpoint (the `-hf` ones)"""
    lora_rank: int = 32
    """LoRA rank on the language model's linear layers; 0 trains the full model"""
    lora_alpha: int = 64
    """LoRA scaling numerator (scale = alpha / rank)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (saves memory, costs ~30% time)"""
    bf16: bool = True
    """on GPU: bfloat16 weights for the frozen base under LoRA, and bf16 autocast (ignored on CPU)"""
    fsdp: Literal["auto", "on", "off"] = "auto"
    """FSDP2: shard weights, gradients and AdamW state over ranks (auto: on for full fine-tuning, --lora-rank 0, with
    more than one rank)"""
    # --- environment ---
    env_id: str = "PushCube-v1"
    """ManiSkill3 task id"""
    instruction: Optional[str] = None
    """override the task's language instruction"""
    obj_set: Literal["train", "test", "all"] = "train"
    """object/background split of PutOnPlateInScene25Main-v3 and its out-of-distribution variants (RLinf evaluates
    the variants with test); other tasks accept only train"""
    num_envs: int = 64
    """parallel envs per rank = episodes per iteration per rank; a multiple of group_size"""
    num_initial_states: int = 0
    """train on a fixed set of initial states, the env reset seeds 0 .. K-1 (as LIBERO's fixed init states); each
    group draws one. 0: every group draws a fresh seed from [0, 2**31). Evaluation always uses held-out seeds"""
    max_episode_steps: int = 75
    """env steps (= policy queries) per episode"""
    image_size: int = 224
    """camera resolution (square); the processor resizes it to the model's input size"""
    sim_backend: Literal["auto", "cpu", "gpu"] = "auto"
    """ManiSkill physics: auto is gpu (physx_cuda, all envs in one process) when CUDA is visible, else cpu (one
    worker process per core, each with a slice of the envs). physx_cuda downloads its PhysX GPU library from GitHub on
    first use; on a node without internet, use cpu (the policy still runs on the GPU)"""
    # --- algorithm: GRPO ---
    total_iterations: int = 200
    """number of rollout + update iterations"""
    group_size: int = 8
    """episodes per initial state (one GRPO group); at least 2"""
    reward_coef: float = 5.0
    """outcome reward = reward_coef x success at the end of the episode"""
    learning_rate: float = 5e-6
    """AdamW learning rate"""
    update_epochs: int = 1
    """passes over each rollout"""
    num_minibatches: int = 4
    """optimizer steps per epoch (each rank's training samples split into this many minibatches)"""
    micro_batch_size: int = 16
    """samples per forward/backward; a minibatch accumulates gradients over micro-batches"""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """token-mean (the anchor's): every sampled token weighs the same, so a long episode weighs more, and failures,
    which run to the time limit while successes end early, outweigh successes (the update then mostly pushes sampled
    tokens down and entropy rises); seq-mean-token-mean (verl's name): every episode weighs the same"""
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
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    temperature: float = 1.6
    """sampling temperature of training rollouts (the training log-prob uses the same one)"""
    top_k: int = 0
    """sample only among the k most likely allowed tokens (0: off)"""
    top_p: float = 1.0
    """sample only from the smallest allowed set with probability >= top_p (1.0: off)"""
    # --- eval, logging, checkpoints ---
    eval_interval: int = 10
    """evaluate every this many iterations and after the last one (0: only after the last one)"""
    eval_temperature: float = 0.0
    """0 = greedy decoding at eval"""
    capture_video: bool = False
    """save an mp4 of env 0 of each evaluation"""
    track: bool = False
    """mirror the TensorBoard scalars, the hyperparameters and the eval videos to Weights & Biases (pip install wandb;
    WANDB_MODE=offline on a node without network)"""
    wandb_project_name: str = "vla-rl"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B team or user of --track (default: your own)"""
    save_interval: int = 10
    """checkpoint every this many iterations and after the last one (0: only after the last one)"""
    keep_checkpoints: int = 3
    """keep only the newest this many checkpoints (0: all)"""
    resume: Optional[str] = None
    """checkpoint step directory, or a checkpoints directory with a `latest` file, to continue from; `auto`: this run
    directory's own checkpoints if it has any, else a new run (the setting for torchrun --max-restarts, Slurm
    --requeue and Kubernetes restarts, which relaunch the same command)"""
    eval_only: bool = False
    """only evaluate --checkpoint (or the base model if none) and exit"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    overwrite: bool = False
    """start over in a run directory that holds checkpoints, deleting them (or, with --resume from an older step,
    delete the later steps)"""
    dist_timeout_s: float = 300.0
    """seconds a collective waits for the other ranks before this rank stops with an error naming where it waited (a
    dead or hung rank then ends the job in this time, not PyTorch's 10-30 minutes)"""

    # derived from the flags above in validate()
    num_groups: tyro.conf.Suppress[int] = 0
    """GRPO groups (initial states) per rank per iteration (num_envs / group_size)"""
    global_episodes: tyro.conf.Suppress[int] = 0
    """episodes per iteration over all ranks (num_envs x world size)"""


def validate(args: Args, world_size: int):
    """Every check that can fail on user input, before envs or weights are loaded. Returns the processor, the action
    template and the run directory."""
    check_tracking(args)  # --track without wandb installed
    check_flags(
        args,
        positive=(
            "num_envs",
            "num_minibatches",
            "micro_batch_size",
            "update_epochs",
            "total_iterations",
            "max_episode_steps",
        ),
        non_negative=(
            "eval_interval",
            "save_interval",
            "keep_checkpoints",
            "eval_temperature",
            "top_k",
            "num_initial_states",
        ),
    )
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
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    fsdp.use_fsdp(args.fsdp, args.lora_rank, world_size)  # --fsdp on with LoRA -> error now
    if args.image_size < 32:
        raise ValueError(f"--image-size must be at least 32 (pixels per side), got {args.image_size}")
    run_path = check_run_flags(args, "grpo_internvl.py", inherited=("model_path", "lora_rank", "lora_alpha"))
    check_env_id(args.env_id)
    obj_set_kwargs(args.env_id, args.obj_set)  # --obj-set on a task without a split -> error now
    check_render_device()
    return *load_processor_and_template(args.model_path), run_path


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the sampling distribution (allowed tokens, temperature, top-k/top-p) and its log-prob
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Prefix-constrained decoding (rollout) and the teacher-forced forward (update)
# ---------------------------------------------------------------------------------------------------------------


class Sampled(NamedTuple):
    choices: torch.Tensor  # (B, F) index of each free token in its slot's allowed set
    tokens: torch.Tensor  # (B, F) vocabulary ids of the free tokens
    logp: torch.Tensor  # (B, F) log-prob of each free token under the sampling distribution
    support: torch.Tensor  # (B, F, S) allowed tokens kept by top-k/top-p: the support sampled from
    entropy: torch.Tensor  # (B, F) entropy of the sampling distribution


@torch.no_grad()
def generate_actions(policy, inputs, template: ActionTemplate, temperature: float, top_k: int, top_p: float) -> Sampled:
    """Prefix-constrained sampling, batched with the KV cache. temperature 0 is greedy (eval).

    The answer alternates forced runs and free slots: forced run 0, free slot 0, forced run 1, free slot 1, ...,
    the closing forced run. One forward per free slot feeds the previously sampled token plus the forced run before
    the slot (the first forward, the prefill, also carries the prompt and the image), then samples the slot from its
    allowed tokens only. The template (common/models/action_text.py) provides, for a tokenizer:
        template.forced[f]    token ids of the forced run right before free slot f
        template.free_set[f]  which allowed set slot f draws from: 0 sign {" ", " -"}, 1 number or digit, 2 gripper
        template.set_ids      (3, S) vocabulary ids of each allowed set, padded to a common width S
        template.set_valid    (3, S) False at the padding
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, device = ids.size(0), ids.device
    allowed_ids, allowed_valid = template.set_ids.to(device), template.set_valid.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    cache = DynamicCache()
    step_ids, step_pos = ids, positions
    choices, tokens, logps, supports, entropies = [], [], [], [], []
    for f in range(template.num_free):
        forced_run = torch.tensor(template.forced[f], dtype=torch.long, device=device).expand(batch, -1)
        step_ids = torch.cat([step_ids, forced_run], dim=1)
        step_pos = torch.cat([step_pos, step_pos[:, -1:] + 1 + torch.arange(forced_run.size(1), device=device)], 1)
        mask = torch.cat([mask, mask.new_ones(batch, forced_run.size(1) + (f > 0))], dim=1)
        out = policy(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            past_key_values=cache,
            use_cache=True,
            pixel_values=inputs["pixel_values"] if f == 0 else None,
            logits_to_keep=1,
        )
        slot_set = template.free_set[f]  # the allowed set of this slot
        logits = out.logits[:, -1, allowed_ids[slot_set]]  # (B, S) logits of the slot's allowed tokens only
        check_finite_logits(logits)
        valid = allowed_valid[slot_set].expand(batch, -1)
        if temperature > 0:
            support = sampling_support(logits.float() / temperature, valid, top_k, top_p)
            logp = policy_logprobs(logits, support, temperature)  # (B, S)
            choice = torch.multinomial(logp.exp(), 1).squeeze(1)  # (B,) index into the allowed set
        else:
            support = valid
            logp = policy_logprobs(logits, support, 1.0)
            choice = logits.float().masked_fill(~valid, -math.inf).argmax(-1)
        token = allowed_ids[slot_set][choice]  # (B,) its vocabulary id: the next forward's input
        choices.append(choice)
        tokens.append(token)
        logps.append(logp.gather(1, choice[:, None]).squeeze(1))
        supports.append(support)
        entropies.append(torch.special.entr(logp.exp()).sum(-1))
        step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
    return Sampled(*(torch.stack(x, 1) for x in (choices, tokens, logps, supports, entropies)))


def free_slot_logits(policy, inputs, answer_ids: torch.Tensor, template: ActionTemplate) -> torch.Tensor:
    """One teacher-forced forward over prompt + answer -> logits of the allowed sets at the free slots (B, F, S)."""
    last_free = int(template.free_pos[-1])
    ids = torch.cat([inputs["input_ids"], answer_ids[:, :last_free]], dim=1)  # the last free token is never an input
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(ids.size(0), last_free)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = (
        inputs["input_ids"].size(1) - 1 + template.free_pos.to(ids.device)
    )  # (F,) positions predicting the free tokens
    out = policy(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        pixel_values=inputs["pixel_values"],
        use_cache=False,
        logits_to_keep=rows,
    )
    slot_ids = template.set_ids.to(ids.device)[template.free_set.to(ids.device)]  # (F, S)
    return out.logits.gather(2, slot_ids.expand(ids.size(0), -1, -1))  # (B, F, S)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: GRPO advantages, dynamic sampling, clipped token-mean loss
# ---------------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (N,) of N // group_size consecutive groups -> A = (R - group mean) / (unbiased group std + 1e-6), (N,).
    Computed in float64; a group whose rewards are all equal gets exactly 0 (it carries no signal)."""
    grouped = rewards.double().view(-1, group_size)  # (groups, group_size)
    std = grouped.std(1, keepdim=True)
    advantages = torch.where(std > 0, (grouped - grouped.mean(1, keepdim=True)) / (std + 1e-6), 0.0)
    return advantages.view(-1).float()


def keep_groups(success: torch.Tensor, group_size: int, success_bounds: tuple[float, float]) -> torch.Tensor:
    """Dynamic sampling: success (N,) -> (N,) bool, True for every episode of a group whose success rate lies in
    [lower, upper]."""
    rate = success.float().view(-1, group_size).mean(1)  # (groups,)
    keep = (rate >= success_bounds[0]) & (rate <= success_bounds[1])
    return keep.repeat_interleave(group_size)


def episode_weights(length: torch.Tensor, kept: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """Per-episode weight of its tokens in the loss, (N,). token-mean: 1. seq-mean-token-mean: mean kept length over all
    ranks / own length, so that every kept episode's tokens add up to the same weight and the token-mean's scale is
    kept."""
    if loss_agg_mode == "token-mean":
        return torch.ones(len(length))
    totals = all_reduce_mean({"length": (length * kept).sum().item(), "episodes": kept.sum().item()})
    return totals["length"] / max(totals["episodes"], 1.0) / length.float()


def clipped_token_loss(
    new_logprob, old_logprob, advantages, token_mask, clip_low: float, clip_high: float, num_tokens: float
):
    """Token-level clipped surrogate with an asymmetric clip. new_logprob, old_logprob, token_mask (B, K);
    advantages (B,), broadcast to every token of its sample. Returns loss, approx_kl (k3) and clipfrac, each summed
    over the valid tokens and divided by num_tokens (the minibatch's token count over all ranks, so gradients summed
    over micro-batches and ranks give the global token-mean)."""
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    adv = advantages[:, None]
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = (torch.max(pg_loss1, pg_loss2) * token_mask).sum() / num_tokens
    with torch.no_grad():
        approx_kl = (((ratio - 1) - logratio) * token_mask).sum() / num_tokens
        clipfrac = (((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float() * token_mask).sum() / num_tokens
    return loss, approx_kl, clipfrac


def kl_to_reference(logprob, ref_logprob, token_mask, num_tokens: float):
    """k3 estimator of KL(pi || pi_ref) per token, summed over the valid tokens / num_tokens."""
    ref_logratio = ref_logprob - logprob
    return ((ref_logratio.exp() - ref_logratio - 1) * token_mask).sum() / num_tokens


# ---------------------------------------------------------------------------------------------------------------
# Model: InternVL with LoRA adapters (or fully trainable), and the frozen reference
# ---------------------------------------------------------------------------------------------------------------
def load_policy(args: Args, device: torch.device, checkpoint_dir: Optional[str]):
    """InternVL with LoRA adapters or fully trainable; flash-attention 2 when installed, else SDPA.

    On GPU everything runs under bf16 autocast; the frozen base of a LoRA model is stored in bf16 (peft keeps the
    adapters in fp32), fully trained weights stay fp32 so that lr 5e-6 updates are not rounded away.
    """
    full_weights = checkpoint_dir if checkpoint_dir and args.lora_rank == 0 else args.model_path
    dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 and args.lora_rank > 0 else torch.float32
    policy = InternVLForConditionalGeneration.from_pretrained(
        full_weights, dtype=dtype, attn_implementation=attn_implementation(device)
    )
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank > 0:
        if checkpoint_dir:
            if not os.path.exists(os.path.join(checkpoint_dir, "adapter_config.json")):
                raise ValueError(f"{checkpoint_dir} holds no LoRA adapter: was it trained with --lora-rank 0?")
            policy = PeftModel.from_pretrained(policy, checkpoint_dir, is_trainable=True)
        else:
            lora = LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha,
                lora_dropout=0.0,
                target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            )
            policy = get_peft_model(policy, lora)
    return policy.to(device)


@torch.no_grad()
def reference_logits(policy, reference, inputs, answer_ids, template):
    """Logits of the frozen initial policy: LoRA with its adapters switched off, or a frozen copy."""
    if reference is None:
        with policy.disable_adapter():
            return free_slot_logits(policy, inputs, answer_ids, template)
    return free_slot_logits(reference, inputs, answer_ids, template)


# ---------------------------------------------------------------------------------------------------------------
# Rollout: one episode per env, every step's free tokens stored in preallocated (T, N, ...) tensors
# ---------------------------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """One episode per env: (T, N, ...) tensors on the CPU, filled only where `alive` (steps of finished episodes
    are neither generated nor trained on)."""

    instructions: list[str]  # (N,) read at reset
    rgb: torch.Tensor  # (T, N, H, W, 3) uint8 what the policy saw
    tcp_pose: torch.Tensor  # (T, N, 7) end-effector pose, written into the prompt
    choices: torch.Tensor  # (T, N, F) index of each free token in its allowed set
    tokens: torch.Tensor  # (T, N, F) vocabulary ids of the free tokens
    logprobs: torch.Tensor  # (T, N, F) their log-probs under the sampling distribution
    entropy: torch.Tensor  # (T, N, F) entropy of that distribution
    support: torch.Tensor  # (T, N, F, S) the allowed tokens kept by top-k/top-p
    alive: torch.Tensor  # (T, N) bool: step t of env n belongs to its (first) episode
    success: torch.Tensor  # (N,) bool
    length: torch.Tensor  # (N,) env steps
    frames: list  # env 0's frames, when recording an evaluation video
    tokens_generated: int  # answer tokens decoded, forced ones included


class Samples(NamedTuple):
    """What the update trains on: the kept steps of a rollout and each episode's advantage and loss weight."""

    step_idx: torch.Tensor  # (M,) time step of each training sample
    env_idx: torch.Tensor  # (M,) its env (= episode)
    advantages: torch.Tensor  # (N,) per episode, broadcast to every free token of it
    weights: torch.Tensor  # (N,) per episode, the weight of its tokens in the loss (--loss-agg-mode)


@torch.no_grad()
def rollout(policy, processor, template, envs, seeds, args, autocast, evaluation: bool = False) -> Rollout:
    """One episode per env from the given reset seeds, sampled at --temperature (top-k/top-p) or, for evaluation,
    at --eval-temperature without top-k/top-p. Steps of finished episodes are skipped."""
    temperature, top_k, top_p = (
        (args.eval_temperature, 0, 1.0) if evaluation else (args.temperature, args.top_k, args.top_p)
    )
    device = next(policy.parameters()).device
    T, N = envs.max_episode_steps, envs.num_envs
    F, S = template.num_free, template.set_ids.size(1)
    obs = envs.reset(seeds)
    episode_instructions = list(envs.instructions)  # read at reset: an auto-reset may change envs.instructions
    H, W = obs["rgb"].shape[1:3]
    rgb = torch.zeros(T, N, H, W, 3, dtype=torch.uint8)  # (T, N, H, W, 3)
    tcp_pose = torch.zeros(T, N, 7)  # (T, N, 7)
    choices = torch.zeros(T, N, F, dtype=torch.long)  # (T, N, F) index of each free token in its allowed set
    tokens = torch.zeros(T, N, F, dtype=torch.long)  # (T, N, F) vocabulary ids
    logprobs = torch.zeros(T, N, F)  # (T, N, F)
    entropy = torch.zeros(T, N, F)  # (T, N, F)
    support = torch.zeros(T, N, F, S, dtype=torch.bool)  # (T, N, F, S) the allowed tokens kept by top-k/top-p
    alive = torch.zeros(T, N, dtype=torch.bool)  # (T, N) step t of env n belongs to its first episode
    running = torch.ones(N, dtype=torch.bool)
    success = torch.zeros(N, dtype=torch.bool)
    length = torch.full((N,), T)
    record = evaluation and args.capture_video
    frames = [obs["rgb"][0]] if record else []
    bar = progress(T, f"eval {args.env_id}" if evaluation else "rollout", "step", is_main_process())
    for t in range(T):
        rgb[t], tcp_pose[t], alive[t] = obs["rgb"], obs["tcp_pose"], running
        idx = running.nonzero().squeeze(1)
        instructions = [episode_instructions[i] for i in idx]
        inputs = build_inputs(processor, instructions, obs["rgb"][idx], obs["tcp_pose"][idx], device)
        with autocast:
            sampled = generate_actions(policy, inputs, template, temperature, top_k, top_p)
        choices[t, idx], tokens[t, idx], logprobs[t, idx] = (
            sampled.choices.cpu(),
            sampled.tokens.cpu(),
            sampled.logp.cpu(),
        )
        support[t, idx], entropy[t, idx] = sampled.support.cpu(), sampled.entropy.cpu()
        actions = torch.zeros(N, 7)
        actions[idx] = template.to_env_action(choices[t, idx])
        obs, _, terminated, truncated, info = envs.step(actions)
        done = (terminated | truncated) & running
        success |= done & info["success"]
        length[done] = t + 1
        running &= ~done
        if record and alive[t, 0]:
            frames.append(info["final_obs"]["rgb"][0] if done[0] else obs["rgb"][0])
        advance(bar, 1, f"{int((~running).sum())} of {N} episodes ended, {int(success.sum())} succeeded (this rank)")
        if not running.any():
            break
    bar.close()
    return Rollout(
        episode_instructions,
        rgb,
        tcp_pose,
        choices,
        tokens,
        logprobs,
        entropy,
        support,
        alive,
        success,
        length,
        frames,
        int(alive.sum()) * template.answer_len,
    )


# the flags that fix what one evaluation episode is (recorded in eval/step_*.summary.json)
EVAL_PROTOCOL_FLAGS = ("env_id", "obj_set", "instruction", "max_episode_steps", "eval_temperature")


def evaluate(policy, processor, template, envs, args, dist, autocast, step: int):
    """Held-out initial states (common/envs/maniskill.py `held_out_seeds`), greedy unless --eval-temperature; returns
    the metrics, env 0's frames and every rank's episodes."""
    policy.eval()
    seeds = held_out_seeds(dist.rank, envs.num_envs)
    out = rollout(policy, processor, template, envs, seeds, args, autocast, True)
    mine = [
        {
            "task": args.env_id,
            "seed": seed,
            "success": bool(out.success[i]),
            "length": int(out.length[i]),
            "temperature": args.eval_temperature,
        }
        for i, seed in enumerate(seeds)
    ]
    if out.frames and dist.is_main:
        mine[0]["video"] = video_file("eval/video", step)
    episodes = gather_episodes(mine)
    return success_metrics(episodes), out.frames, episodes


# ---------------------------------------------------------------------------------------------------------------
# Update: epochs x minibatches over the kept steps; token-mean over all ranks
# ---------------------------------------------------------------------------------------------------------------
def update_policy(
    policy, optimizer, processor, template, batch: Rollout, samples: Samples, args, autocast, guard, reference=None
) -> dict:
    """PPO-style epochs over the training samples of a rollout; returns actor/* metrics. Each minibatch is one
    optimizer step: micro-batches accumulate the loss summed over tokens / (free tokens of the minibatch over all
    ranks), and gradients are summed over ranks, which gives the exact global token-mean. `guard` (a NonFiniteGuard)
    skips optimizer steps with a non-finite loss or gradient norm. Under FSDP every rank runs the same number of
    micro-batches (padded with weight-0 passes) and FSDP sums the gradients."""
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    sharded = bool(fsdp.fsdp_modules(policy))
    # a padding sample at index M (step 0 of env 0, which every rollout has) for FSDP's weight-0 passes
    step_idx = torch.cat([samples.step_idx, samples.step_idx.new_zeros(1)])
    env_idx = torch.cat([samples.env_idx, samples.env_idx.new_zeros(1)])
    num_samples = len(samples.step_idx)
    policy.train()
    sums = {k: 0.0 for k in ("pg_loss", "approx_kl", "clipfrac", "kl", "grad_norm")}
    num_updates = 0
    for _ in range(args.update_epochs):
        order = torch.randperm(num_samples)
        for minibatch in order.tensor_split(args.num_minibatches):
            num_tokens = all_reduce_sum_(torch.tensor(float(len(minibatch) * template.num_free), device=device)).item()
            if num_tokens == 0:
                continue
            micro_batches = list(minibatch.split(args.micro_batch_size))
            weighted = (
                fsdp.even_micro_batches(micro_batches, filler=torch.tensor([num_samples]))
                if sharded
                else [(micro, 1.0) for micro in micro_batches]
            )
            minibatch_loss = 0.0
            for micro, weight in weighted:
                t, n = step_idx[micro], env_idx[micro]
                instructions = [batch.instructions[i] for i in n]
                inputs = build_inputs(processor, instructions, batch.rgb[t, n], batch.tcp_pose[t, n], device)
                answer_ids = template.assemble(batch.tokens[t, n]).to(device)
                support = batch.support[t, n].to(device)  # (b, F, S) the rollout's sampling support
                choice = batch.choices[t, n].to(device)[..., None]  # (b, F, 1)
                weight_of_token = samples.weights[n].to(device)[:, None]  # (b, 1) its episode's weight
                token_mask = weight_of_token.expand(len(micro), template.num_free)  # (b, F) every free token, weighted
                with autocast:
                    logits = free_slot_logits(policy, inputs, answer_ids, template)
                # the log-prob under the same mask, temperature and top-k/top-p support as the rollout
                new_logprob = policy_logprobs(logits, support, args.temperature).gather(2, choice).squeeze(2)  # (b, F)
                loss, approx_kl, clipfrac = clipped_token_loss(
                    new_logprob,
                    batch.logprobs[t, n].to(device),
                    samples.advantages[n].to(device),
                    token_mask,
                    args.clip_low,
                    args.clip_high,
                    num_tokens,
                )
                sums["pg_loss"] += weight * loss.item()
                if args.kl_coef > 0:
                    with autocast:
                        ref_logits = reference_logits(policy, reference, inputs, answer_ids, template)
                    ref_logprob = policy_logprobs(ref_logits, support, args.temperature).gather(2, choice).squeeze(2)
                    kl = kl_to_reference(new_logprob, ref_logprob, token_mask, num_tokens)
                    loss = loss + args.kl_coef * kl
                    sums["kl"] += weight * kl.item()
                (weight * loss).backward()
                minibatch_loss += weight * loss.detach()
                sums["approx_kl"] += weight * approx_kl.item()
                sums["clipfrac"] += weight * clipfrac.item()
            if not sharded:
                sum_gradients_(params)  # each rank's loss is already divided by the global token count
            grad_norm = fsdp.clip_grad_norm_(params, args.max_grad_norm)  # the norm before clipping
            if guard.finite(minibatch_loss, grad_norm):  # skipped on every rank alike when not
                optimizer.step()
                sums["grad_norm"] += grad_norm.item()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
    if num_updates == 0:
        return {}
    sums = all_reduce_mean(sums)  # token-mean parts summed over ranks; grad_norm identical on every rank
    metrics = {f"actor/{k}": v * world_size() / num_updates for k, v in sums.items() if k != "grad_norm"}
    metrics["actor/grad_norm"] = sums["grad_norm"] / num_updates
    if args.kl_coef == 0:
        del metrics["actor/kl"]
    return metrics


def main(args: Args) -> None:
    # ---------------------------------------------------------------------------------------------------------------
    # Setup: validation, distributed, seeds, model, optimizer, envs
    # ---------------------------------------------------------------------------------------------------------------
    dist = init_dist(args.dist_timeout_s)
    processor, template, run_path = validate(args, dist.world_size)
    device = dist.device
    checkpoint_dir = args.resume or args.checkpoint
    torch.manual_seed(args.seed)  # identical initial LoRA weights on every rank (and broadcast below)
    autocast = bf16_autocast(device, args.bf16)
    sharded = fsdp.use_fsdp(args.fsdp, args.lora_rank, dist.world_size)  # FSDP2 moves each shard to the GPU itself
    policy = load_policy(args, torch.device("cpu") if sharded else device, checkpoint_dir)
    reference = None
    if args.kl_coef > 0 and args.lora_rank == 0:  # LoRA's reference is the base with the adapters switched off
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if sharded:  # per decoder layer and ViT layer, then the root; gradients summed (the loss is a global token-mean)
        fsdp.shard_model(policy, reduce="sum")
        if reference is not None:
            fsdp.shard_model(reference)
    else:
        broadcast_parameters(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    start_iteration = resume_training(args, policy, optimizer, sharded)

    envs = ManiSkillVLAEnv(
        args.env_id,
        args.num_envs,
        sim_backend=args.sim_backend,
        image_size=args.image_size,
        instruction=args.instruction,
        max_episode_steps=args.max_episode_steps,
        env_kwargs=obj_set_kwargs(args.env_id, args.obj_set),
    )
    logger = Logger(run_path, args, enabled=dist.is_main)
    print0(
        f"run {run_path}: {dist.world_size} rank(s) x {args.num_envs} envs = {args.global_episodes} episodes per "
        f"iteration, {args.num_groups} groups of {args.group_size} per rank; "
        f"{sum(p.numel() for p in trainable):,} trainable parameters; {template.num_free} free tokens per action"
    )

    def run_evaluation(step: int) -> tuple[dict, list, list]:
        with fsdp.gathered_params(policy):
            return evaluate(policy, processor, template, envs, args, dist, autocast, step)

    def write(directory: str, full_state: Optional[dict]) -> None:
        """LoRA adapter (or the full model) + processor."""
        policy.save_pretrained(directory, state_dict=full_state)
        processor.save_pretrained(directory)

    shell = RunShell(args, run_path, policy, optimizer, sharded, write, logger, envs, EVAL_PROTOCOL_FLAGS)
    if args.eval_only:
        return shell.eval_only(run_evaluation, start_iteration)

    guard = NonFiniteGuard()  # skips an optimizer step with a non-finite loss or gradient norm
    summary = (  # the line printed after every iteration
        "success {rollout/success_rate:.3f} reward {rollout/reward_mean:.4f} kept {rollout/kept_groups_frac:.2f} "
        "env steps/s {time/env_steps_per_s:.1f}"
    )
    for iteration in range(start_iteration + 1, args.total_iterations + 1):
        # -----------------------------------------------------------------------------------------------------------
        # 1. Rollout: group_size episodes per initial state (reset seed); sampling, shuffling and reset seeds derive
        #    from (seed, rank, iteration), so a resume draws the same ones (the CPU sim itself may still differ:
        #    see docs/results.md)
        # -----------------------------------------------------------------------------------------------------------
        rollout_start = time.time()
        rng = np.random.default_rng([args.seed, dist.rank, iteration])
        torch.manual_seed(int(rng.integers(2**62)))
        group_seeds = rng.integers(0, args.num_initial_states or HELD_OUT_SEED_BASE, size=args.num_groups).tolist()
        seeds = [s for s in group_seeds for _ in range(args.group_size)]
        policy.eval()
        with fsdp.gathered_params(policy):  # FSDP: the full weights for the rollout's many small forwards
            batch = rollout(policy, processor, template, envs, seeds, args, autocast)
        rollout_s = time.time() - rollout_start

        # -----------------------------------------------------------------------------------------------------------
        # 2. Reward: reward_coef x success at the end of the episode (outcome reward)
        # -----------------------------------------------------------------------------------------------------------
        rewards = args.reward_coef * batch.success.float()  # (N,)

        # -----------------------------------------------------------------------------------------------------------
        # 3. Advantage: group-normalised, broadcast to every free token of the episode; dynamic sampling
        # -----------------------------------------------------------------------------------------------------------
        advantages = group_advantages(rewards, args.group_size)  # (N,)
        kept = (
            keep_groups(batch.success, args.group_size, args.success_bounds)
            if args.dynamic_sampling
            else torch.ones(args.num_envs, dtype=torch.bool)
        )  # (N,)
        step_idx, env_idx = (batch.alive & kept[None, :]).nonzero(as_tuple=True)  # (M,) the training samples
        weights = episode_weights(batch.length, kept, args.loss_agg_mode)  # (N,)
        samples = Samples(step_idx, env_idx, advantages, weights)

        # -----------------------------------------------------------------------------------------------------------
        # 4. Update: clipped token-mean surrogate over the free tokens
        # -----------------------------------------------------------------------------------------------------------
        update_start = time.time()
        update_metrics = update_policy(
            policy, optimizer, processor, template, batch, samples, args, autocast, guard, reference
        )
        update_s = time.time() - update_start

        # -----------------------------------------------------------------------------------------------------------
        # 5. Log, evaluate, checkpoint
        # -----------------------------------------------------------------------------------------------------------
        group_success = batch.success.float().view(-1, args.group_size).mean(1)
        env_steps = int(batch.alive.sum())
        metrics = {
            "actor/lr": optimizer.param_groups[0]["lr"],
            "actor/samples": float(len(step_idx)),
            "actor/skipped_steps": float(guard.skipped_steps),
            "env/worker_restarts": float(envs.worker_restarts),
            "rollout/reward_mean": rewards.mean().item(),
            "rollout/success_rate": batch.success.float().mean().item(),
            "rollout/episode_length": batch.length.float().mean().item(),
            "rollout/kept_groups_frac": kept.float().mean().item(),
            "rollout/groups_all_success_frac": (group_success == 1).float().mean().item(),
            "rollout/groups_all_fail_frac": (group_success == 0).float().mean().item(),
            "rollout/logprob_per_token": batch.logprobs[batch.alive].mean().item(),
            "rollout/entropy": batch.entropy[batch.alive].mean().item(),
            "time/rollout_s": rollout_s,
            "time/update_s": update_s,
            # throughput of all ranks together (x world size, then averaged over ranks)
            "time/env_steps_per_s": env_steps / rollout_s * dist.world_size,
            "time/decode_tokens_per_s": batch.tokens_generated / rollout_s * dist.world_size,
            "time/update_samples_per_s": len(step_idx) * args.update_epochs / max(update_s, 1e-9) * dist.world_size,
        }
        if shell.end_of_iteration(iteration, all_reduce_mean(metrics) | update_metrics, run_evaluation, summary):
            break
    shell.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
