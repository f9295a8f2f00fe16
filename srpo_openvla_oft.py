"""SRPO: Self-Referential Policy Optimization of an OpenVLA-OFT policy in LIBERO, in one file.

Paper: "SRPO: Self-Referential Policy Optimization for Vision-Language-Action Models" (arXiv 2511.15605);
anchors: siiRL's SRPO (progress reward) and SimpleVLA-RL (GRPO on OpenVLA-OFT in LIBERO).

Every iteration: roll out `group_size` episodes for each of `tasks_per_iteration` (task, init state) pairs; the
policy (OpenVLA-OFT "AC-PD") predicts a chunk of 8 actions x 7 dims = 56 action tokens in ONE forward pass
(zero input embeddings at the action slots, bidirectional attention) and all 8 actions are executed. Groups whose
success rate is outside [0.1, 0.9] are dropped (dynamic sampling). Successes get reward 1; each failure gets a
progress reward in (0, 0.6) from how close its V-JEPA 2 video embedding is to the clusters of this batch's
successful trajectories of the same task (`progress_rewards` below: SRPO's contribution). GRPO turns rewards into
group-normalised advantages, and a clipped (0.2 / 0.28) token-mean surrogate over the 56 per-token ratios updates
the policy. `--reward sparse` gives every failure 0: plain GRPO, the SimpleVLA-RL baseline.

Where this file departs from the anchors:
- LoRA (rank 32) on every linear layer by default; the anchors fully fine-tune 7B with FSDP. `--lora-rank 0`
  fully fine-tunes (sharded with FSDP2 over more than one rank). The loss is a token-mean over the whole minibatch of
  all ranks: each rank divides its summed loss by the global token count and gradients are SUMMED over ranks.
- No KL-to-reference term (the anchors' coefficient is 0 too); no re-sampling to refill groups dropped by
  dynamic sampling: the iteration trains on the groups that were kept (and skips the update when none was).
- The old log-probs are the rollout's own (one forward pass fewer); tests/test_srpo_logprob.py shows that the
  training forward reproduces them (same mask, temperature, bin slice; batch padding does not matter).
- The 50 init states of a task serve both training (sampled) and evaluation (the first `eval_init_states`).

Run:
    python srpo_openvla_oft.py --help
    # CPU quickstart: tiny random models, real LIBERO simulation (about 2 minutes on 2 cores)
    python -m common.models.tiny openvla tiny-models/openvla && python -m common.models.tiny vjepa2 tiny-models/vjepa2
    python srpo_openvla_oft.py --model-path tiny-models/openvla --world-model-path tiny-models/vjepa2 \\
        --suite libero_spatial --task-ids 0 --num-envs 2 --group-size 2 --tasks-per-iteration 1 \\
        --no-dynamic-sampling --max-episode-steps 32 --lora-rank 8 --total-iterations 3 --eval-interval 3 \\
        --eval-init-states 2 --save-interval 3 --exp-name srpo_quickstart
    # 8 GPUs, SRPO on LIBERO-Long from the 1-demo SFT model
    torchrun --nproc-per-node 8 srpo_openvla_oft.py --model-path Sylvest/OpenVLA-AC-PD-1traj-libero-long \\
        --suite libero_10 --world-model-path facebook/vjepa2-vitg-fpc64-384
    # the same with plain GRPO (SimpleVLA-RL), for a side-by-side run
    torchrun --nproc-per-node 8 srpo_openvla_oft.py --model-path Sylvest/OpenVLA-AC-PD-1traj-libero-long \\
        --suite libero_10 --reward sparse
    # resume, evaluate
    torchrun --nproc-per-node 8 srpo_openvla_oft.py ... --resume runs/srpo_openvla_oft__s1/checkpoints
    python srpo_openvla_oft.py --eval-only --checkpoint runs/srpo_openvla_oft__s1/checkpoints --suite libero_10
Stopping: SIGTERM (Slurm, Kubernetes) or Ctrl-C finishes the current iteration, writes a checkpoint and exits 0;
continue with --resume. Give the job a grace period longer than one iteration plus a save (torchrun
--shutdown-timeout, Slurm --signal=TERM@N, Kubernetes terminationGracePeriodSeconds).
"""

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from peft import LoraConfig

from common import fsdp
from common.checkpoint import (
    check_run_flags,
    verify_safetensors_files,
)
from common.dist import (
    all_gather_cat,
    all_reduce_mean,
    all_reduce_sum_,
    bf16_autocast,
    broadcast_parameters,
    init_dist,
    print0,
    sum_gradients_,
    world_size,
)
from common.envs.libero import (
    OFT_EVAL_MAX_STEPS,
    LiberoVectorEnv,
    check_task_ids,
    configure_rendering,
    eval_episodes,
    init_state_draws,
    load_suite,
    to_libero_actions,
)
from common.evaluation import advance, gather_episodes, progress, rate
from common.guards import (
    NonFiniteGuard,
    check_finite_logits,
    check_flags,
)
from common.logger import Logger, check_tracking, video_file
from common.models.openvla import (
    ActionTokenizer,
    action_stats,
    load_lora_adapter,
    load_openvla,
    make_trainable,
    read_openvla_config,
    resolve_model_path,
    save_lora_adapter,
    save_openvla,
)
from common.models.vjepa2 import VideoEmbedder, check_world_model, subsample_frame_indices
from common.run import RunShell, resume_training

CHUNK_STEPS, ACTION_DIM = 8, 7  # OpenVLA-OFT LIBERO: 8 actions of 7 dims per query
NUM_ACTION_TOKENS = CHUNK_STEPS * ACTION_DIM  # 56, predicted in one forward pass
N_BINS = 256


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "srpo_openvla_oft"
    """name of the run; logs, videos and checkpoints go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds model init, task sampling and action sampling (offset by rank and iteration)"""
    # --- model ---
    model_path: str = "Sylvest/OpenVLA-AC-PD-1traj-libero-long"
    """OpenVLA-OFT checkpoint: local directory or hub id (dataset_statistics.json beside the weights is used)"""
    unnorm_key: Optional[str] = None
    """action statistics key; default `{suite}` if the checkpoint has it, else `{suite}_no_noops`, else its only key"""
    lora_rank: int = 32
    """LoRA rank on every linear layer (0: full fine-tuning)"""
    lora_alpha: int = 16
    """LoRA scaling numerator (the adapter is scaled by alpha / rank)"""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (saves memory, costs ~30% time)"""
    bf16: bool = True
    """on GPU: bfloat16 weights for the frozen base under LoRA (and for V-JEPA 2), and bf16 autocast"""
    fsdp: Literal["auto", "on", "off"] = "auto"
    """FSDP2: shard weights, gradients and AdamW state over ranks (auto: on for full fine-tuning, --lora-rank 0, with
    more than one rank)"""
    # --- environment ---
    suite: str = "libero_10"
    """LIBERO suite: libero_spatial, libero_object, libero_goal, libero_10 (long) or libero_90"""
    task_ids: Optional[list[int]] = None
    """task ids of the suite to train and evaluate on (default: all)"""
    num_envs: int = 16
    """parallel LIBERO envs per rank (one subprocess each)"""
    max_episode_steps: int = 512
    """env steps per episode (not policy queries: a query executes 8); 512 in SimpleVLA-RL, siiRL and RLinf"""
    oft_eval_max_steps: bool = False
    """use the OpenVLA-OFT paper's evaluation limits instead (220/280/300/520/400 env steps by suite)"""
    center_crop: bool = True
    """the central 0.9-area crop (then back to 224) that OpenVLA-OFT checkpoints were trained and evaluated with"""
    env_max_restarts: int = 2
    """restart a dead LIBERO worker and redo its episode at most this many times per call"""
    camera_size: int = 256
    """agentview render resolution before the resize to 224"""
    env_workers: bool = True
    """run each env in a subprocess (False: step them one after another in this process)"""
    pipeline_stages: int = 2
    """split each rank's envs into this many groups (or one group per env, if fewer): the policy acts for one while
    the others simulate (1: act for all, then step all; with --no-env-workers nothing overlaps)"""
    mujoco_gl: Optional[str] = None
    """MuJoCo rendering backend: egl or osmesa (default: MUJOCO_GL, else egl with a GPU, osmesa without)"""
    # --- algorithm: SRPO (GRPO with a world-model progress reward) ---
    total_iterations: int = 300
    """number of rollout + update iterations"""
    tasks_per_iteration: int = 64
    """(task, init state) groups per iteration, over all ranks"""
    group_size: int = 8
    """rollouts per (task, init state) group (GRPO's n); at least 2"""
    reward: Literal["progress", "sparse"] = "progress"
    """progress: SRPO's world-model progress reward for failures; sparse: success only (plain GRPO)"""
    reward_coef: float = 5.0
    """a success is worth reward_coef (progress rewards are scaled the same way)"""
    world_model_path: str = "facebook/vjepa2-vitg-fpc64-384"
    """V-JEPA 2 encoder for the progress reward (hub id or save_pretrained directory)"""
    world_model_frames: int = 64
    """frames subsampled from each trajectory video for the embedding"""
    world_model_offload: bool = False
    """keep the V-JEPA 2 weights on the CPU between reward computations (saves GPU memory)"""
    progress_variant: Literal["siirl", "paper"] = "siirl"
    """siirl: 0.6 sigmoid(10 (0.5 - min-max normalised distance)); paper: alpha sigmoid(-standardised distance)"""
    paper_alpha: float = 0.8
    """alpha of the paper variant"""
    learning_rate: float = 5e-6
    """AdamW learning rate"""
    update_epochs: int = 1
    """passes over each rollout"""
    num_minibatches: int = 1
    """optimizer steps per epoch (each rank's training samples split into this many minibatches)"""
    micro_batch_size: int = 8
    """samples (policy queries) per forward/backward; a minibatch accumulates gradients over micro-batches"""
    clip_low: float = 0.2
    """ratio clipped below at 1 - clip_low"""
    clip_high: float = 0.28
    """ratio clipped above at 1 + clip_high"""
    dynamic_sampling: bool = True
    """drop groups whose success rate lies outside success_bounds (they carry no signal)"""
    success_bounds: tuple[float, float] = (0.1, 0.9)
    """kept groups have lower <= success rate <= upper"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    temperature: float = 1.6
    """sampling temperature of training rollouts (the training log-prob uses the same one)"""
    # --- eval, logging, checkpoints ---
    eval_interval: int = 25
    """evaluate every this many iterations and after the last one (0: only after the last one)"""
    eval_init_states: int = 50
    """init states per task in evaluation (the suite's first ones; all 50 by default)"""
    eval_temperature: float = 0.0
    """0 = greedy (argmax over the bins)"""
    capture_video: bool = True
    """save one successful and one failed evaluation episode as mp4 per evaluation"""
    track: bool = False
    """mirror the TensorBoard scalars, the hyperparameters and the eval videos to Weights & Biases (pip install wandb;
    WANDB_MODE=offline on a node without network)"""
    wandb_project_name: str = "vla-rl"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B team or user of --track (default: your own)"""
    save_interval: int = 25
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
    groups_per_rank: tyro.conf.Suppress[int] = 0
    """(task, init state) groups per rank per iteration (tasks_per_iteration / world size)"""
    rollouts_per_rank: tyro.conf.Suppress[int] = 0
    """episodes per rank per iteration (groups_per_rank x group_size), run in waves of num_envs"""


def validate(args: Args, world_size: int):
    """Every check that can fail on user input, before envs or weights are loaded. Returns the run directory."""
    check_tracking(args)  # --track without wandb installed
    check_flags(
        args,
        positive=(
            "num_envs",
            "pipeline_stages",
            "tasks_per_iteration",
            "num_minibatches",
            "micro_batch_size",
            "update_epochs",
            "total_iterations",
            "max_episode_steps",
            "eval_init_states",
            "world_model_frames",
        ),
        non_negative=("eval_interval", "save_interval", "keep_checkpoints", "eval_temperature", "env_max_restarts"),
    )
    if not args.temperature > 0:
        raise ValueError(
            f"--temperature must be > 0 for training rollouts, got {args.temperature} "
            "(--eval-temperature 0 is greedy evaluation)"
        )
    if args.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 (GRPO normalises within a group), got {args.group_size}")
    if args.tasks_per_iteration % world_size:
        raise ValueError(
            f"--tasks-per-iteration {args.tasks_per_iteration} must be divisible by the world size {world_size}"
        )
    args.groups_per_rank = args.tasks_per_iteration // world_size
    args.rollouts_per_rank = args.groups_per_rank * args.group_size
    if args.rollouts_per_rank % args.num_envs:
        raise ValueError(
            f"--tasks-per-iteration / world size x --group-size = {args.rollouts_per_rank} rollouts per "
            f"rank must be divisible by --num-envs {args.num_envs}"
        )
    if not 0 <= args.success_bounds[0] <= args.success_bounds[1] <= 1:
        raise ValueError(f"--success-bounds must satisfy 0 <= lower <= upper <= 1, got {args.success_bounds}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    fsdp.use_fsdp(args.fsdp, args.lora_rank, world_size)  # --fsdp on with LoRA -> error now
    tasks = load_suite(args.suite)  # unknown suite / missing assets
    args.task_ids = list(range(len(tasks))) if args.task_ids is None else args.task_ids
    check_task_ids(tasks, args.task_ids, args.suite)
    run_path = check_run_flags(
        args, "srpo_openvla_oft.py", inherited=("model_path", "unnorm_key", "lora_rank", "lora_alpha")
    )
    args.model_path = resolve_model_path(args.model_path)
    verify_safetensors_files(args.model_path)
    load_action_stats(args.model_path, read_openvla_config(args.model_path), args.suite, args.unnorm_key)
    if args.reward == "progress" and not args.eval_only:
        check_world_model(args.world_model_path)
    if args.eval_init_states > min(len(task.init_states) for task in tasks):
        raise ValueError(
            f"--eval-init-states {args.eval_init_states}: the {args.suite} tasks have "
            f"{min(len(task.init_states) for task in tasks)} init states"
        )
    configure_rendering(args.mujoco_gl)  # no rendering backend -> error now
    return run_path


# ---------------------------------------------------------------------------------------------------------------
# OpenVLA-OFT policy: 56 action tokens in one bidirectional forward pass
# ---------------------------------------------------------------------------------------------------------------
class OFTPolicy(nn.Module):
    """Sequence: [pads, <s>, 256 patches, prompt, "▁", 56 placeholders (zero embeddings), </s>].

    Attention is bidirectional over every non-pad position (the mask is built here, so stock transformers works).
    Logit row j of the action slice (starting at the "▁" position) predicts chunk step j // 7, dim j % 7, as a
    256-way choice over the bin tokens [vocab - 256, vocab)."""

    def __init__(self, vla, stop_token_id: int):
        super().__init__()
        self.vla, self.stop_token_id = vla, stop_token_id
        self.first_action_token = vla.vocab_size - N_BINS

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, attention_mask (B, L) left-padded prompts ending in "▁"; pixel_values (B, 6, 224, 224)
        -> action-bin logits (B, 56, 256)."""
        B = input_ids.shape[0]
        placeholders = torch.full((B, NUM_ACTION_TOKENS), self.first_action_token, device=input_ids.device)
        stop = torch.full((B, 1), self.stop_token_id, device=input_ids.device)
        ids = torch.cat([input_ids, placeholders, stop], 1)  # (B, L + 57)
        mask = torch.cat([attention_mask, torch.ones_like(ids[:, input_ids.shape[1] :])], 1)
        is_placeholder = torch.zeros_like(ids, dtype=torch.bool)
        is_placeholder[:, input_ids.shape[1] : -1] = True
        text_embeds = self.vla.language_model.get_input_embeddings()(ids) * ~is_placeholder[..., None]  # (B, L + 57, D)
        embeds, mask, position_ids = self.vla.embed_multimodal(ids, mask, pixel_values, text_embeds)  # (B, S, D)
        bidirectional = mask[:, None, None, :].bool()  # (B, 1, 1, S): every query attends to every non-pad key
        hidden = self.vla.language_model.model(
            inputs_embeds=embeds, attention_mask=bidirectional, position_ids=position_ids
        ).last_hidden_state  # (B, S, D)
        action_hidden = hidden[:, -(NUM_ACTION_TOKENS + 2) : -2]  # (B, 56, D): "▁" and the first 55 placeholders
        bin_weights = self.vla.language_model.lm_head.weight[self.first_action_token : self.first_action_token + N_BINS]
        return action_hidden @ bin_weights.T  # (B, 56, 256), bin k <-> token first_action_token + k


def bin_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(bin logits / T): the law the rollout samples from and the training ratio uses. (B, 56, 256)"""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def bins_to_actions(
    bins: torch.Tensor, policy: OFTPolicy, action_tokenizer: ActionTokenizer, stats: dict
) -> np.ndarray:
    """(B, 56) bin indices -> (B, 8, 7) un-normalised actions (BOUNDS_Q99 with +1e-8, as OFT)."""
    normalized = action_tokenizer.tokens_to_normalized(bins.cpu() + policy.first_action_token).double()
    return ActionTokenizer.unnormalize(normalized.view(-1, CHUNK_STEPS, ACTION_DIM), stats, eps=1e-8).numpy()


def load_action_stats(model_dir: str, config: dict, suite: str, unnorm_key: Optional[str]) -> dict:
    """OFT checkpoints keep their statistics in dataset_statistics.json (keys like libero_10_no_noops)."""
    stats_file = os.path.join(model_dir, "dataset_statistics.json")
    if os.path.isfile(stats_file):
        with open(stats_file) as f:
            config = {**config, "norm_stats": json.load(f)}
    norm_stats = config.get("norm_stats") or {}
    if unnorm_key is None:  # `{suite}` when present, else `{suite}_no_noops` (SimpleVLA-RL's order)
        unnorm_key = next((k for k in (suite, f"{suite}_no_noops") if k in norm_stats), None)
    return action_stats(config, unnorm_key)


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: SRPO's world-model progress reward (siiRL's implementation; the paper's variant by flag)
# ---------------------------------------------------------------------------------------------------------------
def progress_rewards(
    embeddings: np.ndarray,
    success: np.ndarray,
    task_ids: np.ndarray,
    variant: str = "siirl",
    alpha: float = 0.8,
    eps: float = 0.5,
    min_samples: int = 2,
) -> tuple[np.ndarray, int]:
    """embeddings (N, D), success (N,) bool, task_ids (N,) -> rewards (N,), number of success clusters.

    Per task: successes get 1. The success embeddings are standardised and clustered with DBSCAN(eps 0.5,
    min_samples 2); cluster centres are the cluster means in the raw embedding space (all noise -> the mean of all
    successes). A failure's distance d is its L2 distance to the nearest centre; over the task's failures
    n = (d - min d) / (max d - min d) (0.5 when the range is < 1e-6) and its reward is 0.6 sigmoid(10 (0.5 - n)),
    in (0, 0.6). A task with no success gives its failures 0 (nothing to refer to). variant "paper":
    alpha sigmoid(-z) with z the failure distances standardised over the task (our reading of the paper)."""
    from sklearn.cluster import DBSCAN
    from sklearn.preprocessing import StandardScaler

    embeddings = np.asarray(embeddings, dtype=np.float64)
    success, task_ids = np.asarray(success, dtype=bool), np.asarray(task_ids)
    rewards = success.astype(np.float64)  # successes 1, failures 0 unless shaped below
    num_clusters = 0
    for task in np.unique(task_ids):
        succ_idx = np.flatnonzero((task_ids == task) & success)
        fail_idx = np.flatnonzero((task_ids == task) & ~success)
        if len(succ_idx) == 0 or len(fail_idx) == 0:
            continue
        succ = embeddings[succ_idx]
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit(StandardScaler().fit_transform(succ)).labels_
        clusters = sorted(set(labels) - {-1})
        centres = np.stack([succ[labels == c].mean(0) for c in clusters]) if clusters else succ.mean(0, keepdims=True)
        num_clusters += len(centres)
        dist = np.linalg.norm(embeddings[fail_idx, None, :] - centres[None], axis=-1).min(axis=1)  # (num_fail,)
        if variant == "siirl":
            span = dist.max() - dist.min()
            normed = np.full_like(dist, 0.5) if span < 1e-6 else (dist - dist.min()) / span
            rewards[fail_idx] = 0.6 / (1.0 + np.exp(-10.0 * (0.5 - normed)))
        elif variant == "paper":
            std = dist.std()
            z = (dist - dist.mean()) / (std if std > 1e-6 else 1.0)
            rewards[fail_idx] = alpha / (1.0 + np.exp(z))
        else:
            raise ValueError(f"Unknown progress reward variant {variant!r}; choose 'siirl' or 'paper'")
    return rewards, num_clusters


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


# ---------------------------------------------------------------------------------------------------------------
# Rollout: N episodes to the end, every policy query stored in preallocated (Q, N, ...) tensors
# ---------------------------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """Episodes of (task, init state): (Q, N, ...) tensors on the CPU, Q = the most policy queries (8-step chunks) an
    episode can take; a query after its episode ended has an all-False token_mask."""

    images: torch.Tensor  # (Q, N, 224, 224, 3) uint8 what the policy saw
    bins: torch.Tensor  # (Q, N, 56) sampled action bins
    logprobs: torch.Tensor  # (Q, N, 56) their log-probs under the rollout policy
    token_mask: torch.Tensor  # (Q, N, 56) True for the tokens of executed actions
    instructions: list[str]  # (N,)
    task: torch.Tensor  # (N,) task id
    success: torch.Tensor  # (N,) bool
    length: torch.Tensor  # (N,) env steps


class Samples(NamedTuple):
    """What the update trains on: the kept episodes' policy queries and each episode's advantage."""

    query_idx: torch.Tensor  # (M,) query (chunk) of each training sample
    episode_idx: torch.Tensor  # (M,) its episode
    advantages: torch.Tensor  # (R,) per episode, broadcast to every executed action token of it


@torch.no_grad()
def rollout(
    policy,
    processor,
    env_action,
    envs,
    episodes,
    args,
    autocast,
    evaluation: bool = False,
    record_frames: bool = False,
) -> tuple[Rollout, float]:
    """One episode per env from `episodes` [(task id, init state id)] * N, sampled at --temperature, or for evaluation
    at --eval-temperature (0 = greedy). Returns the episodes and the policy's wall time.

    The envs are split into --pipeline-stages groups: while the policy acts for one group, the workers of the others
    simulate their chunks (1 stage: act for all, then step all). Greedy episodes are the same for any number of stages;
    sampled ones draw their random numbers per group."""
    temperature = args.eval_temperature if evaluation else args.temperature
    device = next(policy.parameters()).device
    N, Q = envs.num_envs, math.ceil(envs.max_steps / CHUNK_STEPS)
    images_now, instructions = envs.reset([t for t, _ in episodes], [i for _, i in episodes], record_frames)
    prompt_ids, prompt_mask = processor.prompt_ids(instructions, device)  # (N, L)
    images = torch.zeros((Q, N, *images_now.shape[1:]), dtype=torch.uint8)  # (Q, N, 224, 224, 3)
    bins = torch.zeros((Q, N, NUM_ACTION_TOKENS), dtype=torch.long)  # (Q, N, 56)
    logprobs = torch.zeros((Q, N, NUM_ACTION_TOKENS))  # (Q, N, 56)
    token_mask = torch.zeros((Q, N, NUM_ACTION_TOKENS), dtype=torch.bool)  # (Q, N, 56) executed actions only
    success, done, length = np.zeros(N, bool), np.zeros(N, bool), np.zeros(N, int)
    stages = np.array_split(np.arange(N), min(args.pipeline_stages, N))  # groups of envs
    stepping = {}  # stage -> the query whose chunk its envs are executing
    policy_s = 0.0

    def finish_chunk(k: int) -> None:
        envs_k, q = stages[k], stepping.pop(k)
        images_now[envs_k], success[envs_k], done[envs_k], executed = envs.step_receive(envs_k)
        token_mask[q, envs_k] = (
            torch.arange(NUM_ACTION_TOKENS)[None] // ACTION_DIM < torch.from_numpy(executed)[:, None]
        )
        length[envs_k] += executed

    for q in range(Q):
        for k, envs_k in enumerate(stages):
            if k in stepping:
                finish_chunk(k)  # this group's previous chunk: simulated while the policy acted for the others
            live = torch.from_numpy(envs_k[~done[envs_k]])  # only envs still running are queried
            if len(live) == 0:
                continue
            t_policy = time.time()
            pixel_values = processor.preprocess_images(torch.from_numpy(images_now[live.numpy()]).to(device))
            with autocast:
                logits = policy(prompt_ids[live], prompt_mask[live], pixel_values).float()  # (n, 56, 256)
            check_finite_logits(logits)
            # sample each of the 56 tokens from softmax(bin logits / T); its log-prob under the same law
            logp_all = bin_logprobs(logits, temperature if temperature > 0 else 1.0)
            sampled = (
                torch.distributions.Categorical(logits=logp_all).sample() if temperature > 0 else logits.argmax(-1)
            )
            actions = np.zeros((N, CHUNK_STEPS, ACTION_DIM))
            actions[live.numpy()] = env_action(sampled)
            policy_s += time.time() - t_policy
            images[q, envs_k] = torch.from_numpy(images_now[envs_k])
            bins[q, live] = sampled.cpu()
            logprobs[q, live] = logp_all.gather(-1, sampled[..., None]).squeeze(-1).cpu()
            envs.step_send(envs_k, actions[envs_k])  # all 8 actions of the chunk, unless the episode ends
            stepping[k] = q
        if not stepping:
            break
    for k in list(stepping):
        finish_chunk(k)
    task = torch.tensor([t for t, _ in episodes])
    success, length = torch.from_numpy(success.copy()), torch.from_numpy(length)
    return Rollout(images, bins, logprobs, token_mask, instructions, task, success, length), policy_s


# the flags that fix what one evaluation episode is: recorded in eval/step_*.summary.json and matched against the
# anchors' protocols (common/evaluation.py)
EVAL_PROTOCOL_FLAGS = (
    "suite",
    "task_ids",
    "eval_init_states",
    "eval_temperature",
    "max_episode_steps",
    "oft_eval_max_steps",
    "center_crop",
    "camera_size",
)


def evaluate(policy, processor, env_action, envs, args, dist, autocast, logger, step: int):
    """Every task x its first `eval_init_states` init states, split over ranks; per-task and suite success. Logs a
    success and a failure video itself (eval/video_success, eval/video_failure), so it returns no frames; returns the
    metrics and every rank's episodes."""
    todo = eval_episodes(args.task_ids, args.eval_init_states)[dist.rank :: dist.world_size]
    mine, videos = [], {}
    policy.eval()
    bar = progress(len(todo), f"eval {args.suite}", "episode", dist.is_main)
    for start in range(0, len(todo), envs.num_envs):
        wave = todo[start : start + envs.num_envs]
        padded = wave + [wave[-1]] * (envs.num_envs - len(wave))  # idle envs repeat the last episode
        record = dist.is_main and args.capture_video and len(videos) < 2
        out, _ = rollout(
            policy, processor, env_action, envs, padded, args, autocast, evaluation=True, record_frames=record
        )
        wave_videos = envs.videos() if record else []
        for k, (task_id, init_state) in enumerate(wave):
            outcome = "success" if out.success[k] else "failure"
            mine.append(
                {"task": f"{args.suite}/task_{task_id:02d}", "init_state": init_state, "success": bool(out.success[k])}
                | {"length": int(out.length[k]), "temperature": args.eval_temperature}
            )
            if record and outcome not in videos:  # the first success and the first failure of rank 0
                videos[outcome] = wave_videos[k]
                mine[-1]["video"] = video_file(f"eval/video_{outcome}", step)
        advance(bar, len(wave), f"success {sum(r['success'] for r in mine)} of {len(mine)} (this rank)")
    bar.close()
    episodes = gather_episodes(mine)
    suite_success = rate(episodes)
    metrics = {
        "eval/success_rate": suite_success,
        "eval/episode_length": sum(r["length"] for r in episodes) / len(episodes),
        f"eval/{args.suite}/success_rate": suite_success,
    }
    for task_id in args.task_ids:
        of_task = [r for r in episodes if r["task"] == f"{args.suite}/task_{task_id:02d}"]
        metrics[f"eval/{args.suite}/task_{task_id:02d}_success_rate"] = rate(of_task)
    for outcome, frames in videos.items():
        logger.video(f"eval/video_{outcome}", frames, step, fps=20)
    return metrics, [], episodes


# ---------------------------------------------------------------------------------------------------------------
# Update: epochs x minibatches over the kept policy queries; token-mean over all ranks
# ---------------------------------------------------------------------------------------------------------------
def update_policy(policy, optimizer, processor, batch: Rollout, samples: Samples, args, autocast, guard) -> dict:
    """PPO-style epochs over the training samples of this rank's rollouts; returns actor/* metrics. Each minibatch is
    one optimizer step: micro-batches accumulate the loss summed over tokens / (executed action tokens of the
    minibatch over all ranks), and gradients are summed over ranks, which gives the exact global token-mean. `guard`
    (a NonFiniteGuard) skips optimizer steps with a non-finite loss or gradient norm. Under FSDP every rank runs the
    same number of micro-batches (padded with weight-0 passes) and FSDP sums the gradients."""
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    sharded = bool(fsdp.fsdp_modules(policy))
    # a padding sample at index M (query 0 of episode 0, which every rollout has) for FSDP's weight-0 passes
    query_idx = torch.cat([samples.query_idx, samples.query_idx.new_zeros(1)])
    episode_idx = torch.cat([samples.episode_idx, samples.episode_idx.new_zeros(1)])
    num_samples = len(samples.query_idx)
    policy.train()  # no dropout anywhere, so the same numbers; but --gradient-checkpointing acts only in train mode
    sums = {k: 0.0 for k in ("pg_loss", "approx_kl", "clipfrac", "entropy", "grad_norm")}
    num_updates = 0
    for _ in range(args.update_epochs):
        order = torch.randperm(num_samples)
        for minibatch in order.tensor_split(args.num_minibatches):
            token_mask = batch.token_mask[query_idx[minibatch], episode_idx[minibatch]]  # (m, 56)
            num_tokens = all_reduce_sum_(token_mask.sum().double().to(device)).item()
            if num_tokens == 0:
                continue
            for p in params:  # zeros, not None: a rank without samples still joins the gradient sum
                p.grad = None if sharded else torch.zeros_like(p)
            micro_batches = list(minibatch.split(args.micro_batch_size))
            weighted = (
                fsdp.even_micro_batches(micro_batches, filler=torch.tensor([num_samples]))
                if sharded
                else [(micro, 1.0) for micro in micro_batches]
            )
            minibatch_loss = 0.0
            for micro, weight in weighted:
                q, r = query_idx[micro], episode_idx[micro]
                prompt_ids, prompt_mask = processor.prompt_ids([batch.instructions[i] for i in r], device)
                pixel_values = processor.preprocess_images(batch.images[q, r].to(device))
                bins = batch.bins[q, r].to(device)  # (b, 56)
                with autocast:
                    logits = policy(prompt_ids, prompt_mask, pixel_values).float()  # (b, 56, 256)
                # the per-token log-prob under the rollout's law (bin slice, temperature)
                logp_all = bin_logprobs(logits, args.temperature)  # (b, 56, 256)
                new_logprob = logp_all.gather(-1, bins[..., None]).squeeze(-1)  # (b, 56)
                micro_mask = batch.token_mask[q, r].to(device).float()  # (b, 56)
                loss, approx_kl, clipfrac = clipped_token_loss(
                    new_logprob,
                    batch.logprobs[q, r].to(device),
                    samples.advantages[r].to(device),
                    micro_mask,
                    args.clip_low,
                    args.clip_high,
                    num_tokens,
                )
                (weight * loss).backward()
                minibatch_loss += weight * loss.detach()
                with torch.no_grad():
                    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (b, 56)
                sums["pg_loss"] += weight * loss.item()
                sums["approx_kl"] += weight * approx_kl.item()
                sums["clipfrac"] += weight * clipfrac.item()
                sums["entropy"] += weight * ((entropy * micro_mask).sum() / num_tokens).item()
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
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: LoRA adapter (or the full model in the OFT layout) + trainer state
# ---------------------------------------------------------------------------------------------------------------
def save_policy(
    policy: OFTPolicy,
    processor,
    lora_config: Optional[LoraConfig],
    model_dir: str,
    directory: str,
    full_state: Optional[dict] = None,
):
    """LoRA: adapter_model.safetensors + adapter_config.json; full fine-tuning: the OFT layout under model/.
    full_state: the gathered state dict of an FSDP-sharded policy (its parameters are shards)."""
    if lora_config is not None:
        save_lora_adapter(policy.vla, lora_config, directory)
    else:
        vla_state = fsdp.sub_state_dict(full_state, "vla.") if full_state else None
        save_openvla(policy.vla, processor, os.path.join(directory, "model"), state_dict=vla_state)
        stats_file = os.path.join(model_dir, "dataset_statistics.json")
        if os.path.isfile(stats_file):
            shutil.copy(stats_file, os.path.join(directory, "model"))


def main(args: Args) -> None:
    # ---------------------------------------------------------------------------------------------------------------
    # Setup: validation, distributed, seeds, model, reward model, optimizer, envs
    # ---------------------------------------------------------------------------------------------------------------
    dist = init_dist(args.dist_timeout_s)
    run_path = validate(args, dist.world_size)
    device = dist.device
    print0(
        f"run {run_path}: {dist.world_size} rank(s) x {args.num_envs} envs, {args.tasks_per_iteration} groups x "
        f"{args.group_size} rollouts per iteration"
    )

    torch.manual_seed(args.seed)  # identical initial weights (LoRA) on every rank
    np.random.seed(args.seed + dist.rank)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if (on_gpu and args.bf16 and args.lora_rank > 0) else torch.float32
    autocast = bf16_autocast(device, args.bf16)
    model_dir = args.model_path
    if args.lora_rank == 0 and (args.resume or args.checkpoint):
        model_dir = os.path.join(args.resume or args.checkpoint, "model")
    sharded = fsdp.use_fsdp(args.fsdp, args.lora_rank, dist.world_size)  # FSDP2 moves each shard to the GPU itself
    # SDPA: the bidirectional mask below is not expressible in flash-attention's causal kernel
    vla, processor = load_openvla(
        model_dir, device="cpu" if sharded else device, dtype=dtype, attn_implementation="sdpa"
    )
    stats = load_action_stats(model_dir, vla.config, args.suite, args.unnorm_key)
    action_tokenizer = ActionTokenizer(vla.vocab_size, N_BINS)
    lora_config = make_trainable(vla, args.lora_rank, args.lora_alpha)  # None = full fine-tuning
    if args.gradient_checkpointing:
        vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = OFTPolicy(vla, processor.tokenizer.eos_token_id).eval()  # no dropout anywhere
    if lora_config is not None and (args.resume or args.checkpoint):
        load_lora_adapter(vla, args.resume or args.checkpoint)  # the files were verified in validate()
    if sharded:  # per decoder layer and ViT block, then the root; gradients summed (the loss is a global token-mean)
        fsdp.shard_model(policy, reduce="sum")
    else:
        broadcast_parameters(policy.to(device))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    print0(
        f"trainable parameters: {sum(p.numel() for p in trainable):,} of "
        f"{sum(p.numel() for p in policy.parameters()):,}"
    )

    def env_action(bins: torch.Tensor) -> np.ndarray:
        """(n, 56) bins -> (n, 8, 7) LIBERO commands (gripper -sign(2 g - 1))."""
        return to_libero_actions(bins_to_actions(bins, policy, action_tokenizer, stats))

    embedder = None
    if args.reward == "progress" and not args.eval_only:
        embedder = VideoEmbedder(
            args.world_model_path,
            device,
            torch.bfloat16 if on_gpu and args.bf16 else torch.float32,
            args.world_model_frames,
            args.world_model_offload,
        )
    embed_thread = ThreadPoolExecutor(max_workers=1)  # V-JEPA 2 embeds a finished wave while the next one rolls out

    start_iteration = resume_training(args, policy, optimizer, sharded)
    logger = Logger(run_path, args, enabled=dist.is_main)
    max_steps = OFT_EVAL_MAX_STEPS[args.suite] if args.oft_eval_max_steps else args.max_episode_steps
    envs = LiberoVectorEnv(
        args.suite,
        args.num_envs,
        camera_size=args.camera_size,
        max_steps=max_steps,
        use_workers=args.env_workers,
        gpu_id=dist.local_rank if on_gpu else -1,
        seed=args.seed + dist.rank * args.num_envs,
        center_crop=args.center_crop,
        max_restarts=args.env_max_restarts,
    )

    def run_evaluation(step: int) -> tuple[dict, list, list]:
        with fsdp.gathered_params(policy):
            return evaluate(policy, processor, env_action, envs, args, dist, autocast, logger, step)

    def write(directory: str, full_state: Optional[dict]) -> None:
        """LoRA adapter (or the full model in the OFT layout)."""
        save_policy(policy, processor, lora_config, model_dir, directory, full_state)

    shell = RunShell(args, run_path, policy, optimizer, sharded, write, logger, envs, EVAL_PROTOCOL_FLAGS)
    if args.eval_only:
        return shell.eval_only(run_evaluation, start_iteration)

    # Rollout storage for this rank's R episodes, preallocated on CPU (filled wave by wave, num_envs at a time).
    R, Q = args.rollouts_per_rank, math.ceil(envs.max_steps / CHUNK_STEPS)
    batch = Rollout(
        images=torch.zeros((Q, R, 224, 224, 3), dtype=torch.uint8),
        bins=torch.zeros((Q, R, NUM_ACTION_TOKENS), dtype=torch.long),
        logprobs=torch.zeros((Q, R, NUM_ACTION_TOKENS)),
        token_mask=torch.zeros((Q, R, NUM_ACTION_TOKENS), dtype=torch.bool),
        instructions=[""] * R,
        task=torch.zeros(R, dtype=torch.long),
        success=torch.zeros(R, dtype=torch.bool),
        length=torch.zeros(R, dtype=torch.long),
    )
    guard = NonFiniteGuard()  # skips an optimizer step with a non-finite loss or gradient norm
    summary = (  # the line printed after every iteration
        "success {rollout/success_rate:.3f} reward {rollout/reward_mean:.4f} kept {rollout/kept_groups_frac:.2f} "
        "env steps/s {time/env_steps_per_s:.1f}"
    )

    for iteration in range(start_iteration + 1, args.total_iterations + 1):
        # -----------------------------------------------------------------------------------------------------------
        # 1. Rollout: this rank's groups, group_size episodes each, in waves of num_envs envs. The (task, init state)
        #    pairs run through all 50 init states of every task without replacement, the same draw on every rank;
        #    action sampling derives from (seed, rank, iteration), so a resume replays exactly
        # -----------------------------------------------------------------------------------------------------------
        rollout_start = time.time()
        groups = init_state_draws(
            args.task_ids, args.seed, start=(iteration - 1) * args.tasks_per_iteration, count=args.tasks_per_iteration
        )
        groups = groups[dist.rank * args.groups_per_rank : (dist.rank + 1) * args.groups_per_rank]
        episodes = [g for g in groups for _ in range(args.group_size)]  # (R,) episode r belongs to group r // n
        torch.manual_seed(int(np.random.default_rng([args.seed, dist.rank, iteration]).integers(2**62)))
        policy.eval()
        embeddings, policy_s = [], 0.0
        bar = progress(R, "rollout", "episode", dist.is_main)
        for start in range(0, R, args.num_envs):
            wave = slice(start, start + args.num_envs)
            with fsdp.gathered_params(policy):  # FSDP: the full weights for the rollout's forwards
                out, wave_policy_s = rollout(
                    policy,
                    processor,
                    env_action,
                    envs,
                    episodes[wave],
                    args,
                    autocast,
                    record_frames=embedder is not None,
                )
            batch.images[:, wave], batch.bins[:, wave] = out.images, out.bins  # this wave's episodes
            batch.logprobs[:, wave], batch.token_mask[:, wave] = out.logprobs, out.token_mask
            batch.task[wave], batch.success[wave], batch.length[wave] = out.task, out.success, out.length
            batch.instructions[wave] = out.instructions
            policy_s += wave_policy_s
            if embedder is not None:  # only the frames V-JEPA 2 samples are rendered and processed, in the workers
                picks = [subsample_frame_indices(n + 1, args.world_model_frames) for n in out.length.tolist()]
                embeddings.append(embed_thread.submit(embedder, envs.videos(picks)))  # embeds while the next wave runs
            advance(bar, len(out.success), f"success {int(batch.success[: wave.stop].sum())} (this rank)")
        bar.close()
        rollout_time = time.time() - rollout_start

        # -----------------------------------------------------------------------------------------------------------
        # 2. Reward: success 1; failures of kept groups get the progress reward (per-task pools over all ranks)
        # -----------------------------------------------------------------------------------------------------------
        reward_start = time.time()
        kept = (
            keep_groups(batch.success, args.group_size, args.success_bounds)
            if args.dynamic_sampling
            else torch.ones(R, dtype=torch.bool)
        )  # (R,)
        rewards = batch.success.double()  # (R,) failures 0 unless shaped
        num_clusters, progress_mean = 0, 0.0
        if embedder is not None:
            rank_embeddings = torch.cat([wave.result() for wave in embeddings])  # (R, hidden)
            all_embeddings = all_gather_cat(rank_embeddings).numpy()  # (world x R, hidden)
            all_success, all_task, all_kept = (
                all_gather_cat(x.long()).numpy() for x in (batch.success, batch.task, kept)
            )
            pooled = np.flatnonzero(all_kept)  # the reward sees only kept groups, as the anchor does
            all_rewards = np.zeros(len(all_success))
            all_rewards[pooled], num_clusters = progress_rewards(
                all_embeddings[pooled],
                all_success[pooled].astype(bool),
                all_task[pooled],
                args.progress_variant,
                args.paper_alpha,
            )
            mine = torch.from_numpy(all_rewards[dist.rank * R : (dist.rank + 1) * R])
            rewards = torch.where(kept, mine, rewards)
            failed = pooled[all_success[pooled] == 0]
            progress_mean = float(all_rewards[failed].mean()) if len(failed) else 0.0
        reward_time = time.time() - reward_start

        # -----------------------------------------------------------------------------------------------------------
        # 3. Advantage: group-normalised, broadcast to every action token of the episode; samples = the kept
        #    episodes' policy queries
        # -----------------------------------------------------------------------------------------------------------
        advantages = group_advantages(args.reward_coef * rewards, args.group_size)  # (R,)
        queried = batch.token_mask.any(-1)  # (Q, R) query q of episode r happened
        query_idx, episode_idx = (queried & kept[None, :]).nonzero(as_tuple=True)  # (M,) the training samples
        samples = Samples(query_idx, episode_idx, advantages)

        # -----------------------------------------------------------------------------------------------------------
        # 4. Update: clipped token-mean surrogate over the 56 per-token ratios
        # -----------------------------------------------------------------------------------------------------------
        update_start = time.time()
        update_metrics = update_policy(policy, optimizer, processor, batch, samples, args, autocast, guard)
        update_time = time.time() - update_start

        # -----------------------------------------------------------------------------------------------------------
        # 5. Log, evaluate, checkpoint
        # -----------------------------------------------------------------------------------------------------------
        env_steps = int(batch.length.sum())
        num_samples = len(query_idx)
        metrics = {
            "actor/lr": optimizer.param_groups[0]["lr"],
            "actor/samples": float(num_samples),
            "actor/skipped_steps": float(guard.skipped_steps),
            "rollout/reward_mean": rewards.mean().item(),
            "rollout/success_rate": batch.success.float().mean().item(),
            "rollout/episode_length": batch.length.float().mean().item(),
            "rollout/episodes": float(R),
            "rollout/kept_groups_frac": kept.float().mean().item(),
            "rollout/advantage_abs_mean": advantages[kept].abs().mean().item() if kept.any() else 0.0,
            "reward/progress_mean": progress_mean,
            "reward/num_clusters": float(num_clusters),
            "env/worker_restarts": float(envs.worker_restarts),
            "time/rollout_s": rollout_time,
            "time/reward_s": reward_time,
            "time/update_s": update_time,
            # throughput of all ranks together (x world size, then averaged over ranks)
            "time/env_steps_per_s": env_steps / rollout_time * dist.world_size,
            "time/actions_per_s": env_steps / max(policy_s, 1e-9) * dist.world_size,
            "time/update_samples_per_s": num_samples * args.update_epochs / max(update_time, 1e-9) * dist.world_size,
        }
        if shell.end_of_iteration(iteration, all_reduce_mean(metrics) | update_metrics, run_evaluation, summary):
            break
    embed_thread.shutdown()
    shell.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
