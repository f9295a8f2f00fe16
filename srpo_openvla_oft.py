"""SRPO: Self-Referential Policy Optimization of an OpenVLA-OFT policy in LIBERO, in one file.

Paper: "SRPO: Self-Referential Policy Optimization for Vision-Language-Action Models" (arXiv 2511.15605);
anchors: siiRL's SRPO (progress reward) and SimpleVLA-RL (GRPO on OpenVLA-OFT in LIBERO).

Every update step: roll out `group_size` episodes for each of `tasks_per_step` (task, init state) pairs; the
policy (OpenVLA-OFT "AC-PD") predicts a chunk of 8 actions x 7 dims = 56 action tokens in ONE forward pass
(zero input embeddings at the action slots, bidirectional attention) and all 8 actions are executed. Groups whose
success rate is outside [0.1, 0.9] are dropped (dynamic sampling). Successes get reward 1; each failure gets a
progress reward in (0, 0.6) from how close its V-JEPA 2 video embedding is to the clusters of this batch's
successful trajectories of the same task (common/progress_reward.py). GRPO turns rewards into group-normalised
advantages, and a clipped (0.2 / 0.28) token-mean surrogate over the 56 per-token ratios updates the policy.
`--reward sparse` gives every failure 0: plain GRPO, the SimpleVLA-RL baseline.

Where this file departs from the anchors:
- LoRA (rank 32) on every linear layer by default, gradients averaged over ranks by an all-reduce; the anchors
  fully fine-tune 7B with FSDP. `--lora-rank 0` fully fine-tunes (fits a tiny model or a single-GPU 7B only with
  very large memory; there is no FSDP here).
- No KL-to-reference term (the anchors' coefficient is 0 too); no re-sampling to refill groups dropped by
  dynamic sampling: the step trains on the groups that were kept (and skips the update when none was).
- The old log-probs are the rollout's own (one forward pass fewer); tests/test_srpo_logprob.py shows that the
  training forward reproduces them (same mask, temperature, bin slice; batch padding does not matter).
- The 50 init states of a task serve both training (sampled) and evaluation (the first `eval_init_states`).

Run:
    python srpo_openvla_oft.py --help
    # CPU quickstart: tiny random models, real LIBERO simulation (about 2 minutes on 2 cores)
    python -m common.openvla tiny-models/openvla && python -m common.progress_reward tiny-models/vjepa2
    python srpo_openvla_oft.py --model-path tiny-models/openvla --world-model-path tiny-models/vjepa2 \\
        --suite libero_spatial --task-ids 0 --num-envs 2 --group-size 2 --tasks-per-step 1 --no-dynamic-sampling \\
        --max-episode-steps 32 --lora-rank 8 --total-steps 3 --eval-interval 3 --eval-init-states 2 --save-interval 3 \\
        --exp-name srpo_quickstart
    # 8 GPUs, SRPO on LIBERO-Long from the 1-demo SFT model
    torchrun --nproc-per-node 8 srpo_openvla_oft.py --model-path Sylvest/OpenVLA-AC-PD-1traj-libero-long \\
        --suite libero_10 --world-model-path facebook/vjepa2-vitg-fpc64-384
    # the same with plain GRPO (SimpleVLA-RL), for a side-by-side run
    torchrun --nproc-per-node 8 srpo_openvla_oft.py --model-path Sylvest/OpenVLA-AC-PD-1traj-libero-long \\
        --suite libero_10 --reward sparse
    # resume, evaluate
    torchrun --nproc-per-node 8 srpo_openvla_oft.py ... --resume runs/srpo_openvla_oft__s1/checkpoints
    python srpo_openvla_oft.py --eval-only --checkpoint runs/srpo_openvla_oft__s1/checkpoints --suite libero_10
"""

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from common.checkpoint import (load_trainer_state, resolve_checkpoint, restore_rng, save_checkpoint,
                               save_trainer_state, trainer_state)
from common.dist import (all_reduce_mean, all_reduce_sum_, broadcast_parameters, check_in_sync, cleanup, init_dist,
                         is_dist, print0, sum_gradients_)
from common.libero_env import LiberoVectorEnv, check_task_ids, configure_rendering, load_suite, to_libero_actions
from common.logger import Logger
from common.openvla import (ActionTokenizer, action_stats, load_openvla, make_trainable, read_openvla_config,
                            resolve_model_path, save_openvla)
from common.progress_reward import VideoEmbedder, check_world_model, progress_rewards

CHUNK_STEPS, ACTION_DIM = 8, 7  # OpenVLA-OFT LIBERO: 8 actions of 7 dims per query
NUM_ACTION_TOKENS = CHUNK_STEPS * ACTION_DIM  # 56, predicted in one forward pass
N_BINS = 256


@dataclass
class Args:
    exp_name: str = "srpo_openvla_oft"
    """name of the run; logs, videos and checkpoints go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds model init, task sampling and action sampling (offset by rank and step)"""
    model_path: str = "Sylvest/OpenVLA-AC-PD-1traj-libero-long"
    """OpenVLA-OFT checkpoint: local directory or hub id (dataset_statistics.json beside the weights is used)"""
    unnorm_key: Optional[str] = None
    """action statistics key; default `{suite}_no_noops`, or the only key the checkpoint has"""
    suite: str = "libero_10"
    """LIBERO suite: libero_spatial, libero_object, libero_goal, libero_10 (long) or libero_90"""
    task_ids: Optional[list[int]] = None
    """task ids of the suite to train and evaluate on (default: all)"""
    reward: Literal["progress", "sparse"] = "progress"
    """progress: SRPO's world-model progress reward for failures; sparse: success only (plain GRPO)"""
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

    num_envs: int = 16
    """parallel LIBERO envs per rank (one subprocess each)"""
    group_size: int = 8
    """rollouts per (task, init state) group (GRPO's n)"""
    tasks_per_step: int = 64
    """(task, init state) groups per update step, over all ranks"""
    max_episode_steps: Optional[int] = None
    """policy steps per episode (default: the suite's 220/280/300/520/400)"""
    camera_size: int = 256
    """agentview render resolution before the resize to 224"""
    env_workers: bool = True
    """run each env in a subprocess (False: step them one after another in this process)"""
    mujoco_gl: Optional[str] = None
    """MuJoCo rendering backend: egl or osmesa (default: MUJOCO_GL, else egl with a GPU, osmesa without)"""
    temperature: float = 1.6
    """sampling temperature of training rollouts (the training log-prob uses the same)"""

    total_steps: int = 300
    """update steps"""
    learning_rate: float = 5e-6
    """AdamW learning rate"""
    reward_coef: float = 5.0
    """a success is worth reward_coef (progress rewards are scaled the same way)"""
    clip_low: float = 0.2
    """ratio clip below 1"""
    clip_high: float = 0.28
    """ratio clip above 1"""
    dynamic_sampling: bool = True
    """drop groups whose success rate is outside success_bounds"""
    success_bounds: tuple[float, float] = (0.1, 0.9)
    """kept groups have lower <= success rate <= upper"""
    num_minibatches: int = 1
    """optimizer steps per update step (the rollout samples of each rank split evenly)"""
    micro_batch_size: int = 8
    """policy queries per forward/backward (gradient accumulation inside a minibatch)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    lora_rank: int = 32
    """LoRA rank on every linear layer (0: full fine-tuning)"""
    lora_alpha: int = 16
    """LoRA alpha"""
    gradient_checkpointing: bool = False
    """recompute the language model's activations in backward (less memory)"""
    bf16: bool = True
    """on GPU: bfloat16 weights for the frozen base under LoRA (and for V-JEPA 2), and bf16 autocast"""

    eval_interval: int = 25
    """evaluate every this many update steps (and after the last); 0 disables"""
    eval_init_states: int = 50
    """init states per task in evaluation (the suite's first ones)"""
    eval_temperature: float = 0.0
    """0 = greedy (argmax over the bins)"""
    capture_video: bool = True
    """save one successful and one failed evaluation episode as mp4 per evaluation"""
    save_interval: int = 25
    """checkpoint every this many update steps (and after the last); 0 disables"""
    keep_checkpoints: int = 3
    """keep only the newest this many checkpoints"""
    resume: Optional[str] = None
    """checkpoint step directory or checkpoints directory (its `latest`) to continue from"""
    eval_only: bool = False
    """only evaluate --checkpoint (or the base model if none) and exit"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, L) left-padded prompts ending in "▁"; pixel_values (B, 6, 224, 224)
        -> action-bin logits (B, 56, 256)."""
        B = input_ids.shape[0]
        placeholders = torch.full((B, NUM_ACTION_TOKENS), self.first_action_token, device=input_ids.device)
        stop = torch.full((B, 1), self.stop_token_id, device=input_ids.device)
        ids = torch.cat([input_ids, placeholders, stop], 1)  # (B, L + 57)
        mask = torch.cat([attention_mask, torch.ones_like(ids[:, input_ids.shape[1]:])], 1)
        is_placeholder = torch.zeros_like(ids, dtype=torch.bool)
        is_placeholder[:, input_ids.shape[1]:-1] = True
        text_embeds = self.vla.language_model.get_input_embeddings()(ids) * ~is_placeholder[..., None]  # (B, L + 57, D)
        embeds, mask, position_ids = self.vla.embed_multimodal(ids, mask, pixel_values, text_embeds)  # (B, S, D)
        bidirectional = mask[:, None, None, :].bool()  # (B, 1, 1, S): every query attends to every non-pad key
        hidden = self.vla.language_model.model(inputs_embeds=embeds, attention_mask=bidirectional,
                                               position_ids=position_ids).last_hidden_state  # (B, S, D)
        action_hidden = hidden[:, -(NUM_ACTION_TOKENS + 2):-2]  # (B, 56, D): "▁" and the first 55 placeholders
        bin_weights = self.vla.language_model.lm_head.weight[self.first_action_token:self.first_action_token + N_BINS]
        return action_hidden @ bin_weights.T  # (B, 56, 256), bin k <-> token first_action_token + k


def bin_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(bin logits / T): the law the rollout samples from and the training ratio uses. (B, 56, 256)"""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def bins_to_actions(bins: torch.Tensor, policy: OFTPolicy, action_tokenizer: ActionTokenizer, stats: dict) -> np.ndarray:
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
    if unnorm_key is None and f"{suite}_no_noops" in norm_stats:
        unnorm_key = f"{suite}_no_noops"
    return action_stats(config, unnorm_key)


def all_gather_cat(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate equally-shaped tensors of all ranks along dim 0 (rank order)."""
    if not is_dist():
        return t
    parts = [torch.empty_like(t, device=device) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, t.to(device))
    return torch.cat(parts).cpu()


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: dynamic sampling, GRPO advantages, clipped token-mean loss
# ---------------------------------------------------------------------------------------------------------------
def keep_groups(success: np.ndarray, group_size: int, bounds: tuple[float, float]) -> np.ndarray:
    """success (R,) with R = G x group_size -> (G,) True where lower <= group success rate <= upper."""
    rate = success.reshape(-1, group_size).mean(1)
    return (rate >= bounds[0]) & (rate <= bounds[1])


def grpo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """scores (G, n) -> (G, n): (R - group mean) / (unbiased group std + 1e-6); a group of one keeps A = R."""
    if scores.shape[1] == 1:
        return scores.clone()
    return (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)


def clipped_token_loss(new_logprob, old_logprob, advantages, token_mask, clip_low: float, clip_high: float,
                       num_tokens: float):
    """Per-token PPO surrogate with asymmetric clipping, summed over valid tokens / num_tokens (the token count of
    the whole minibatch over all ranks, so the gradients summed over micro-batches and ranks are a token-mean).
    new_logprob, old_logprob, token_mask (b, 56); advantages (b, 1)."""
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg_loss = torch.max(pg_loss1, pg_loss2)
    loss = (pg_loss * token_mask).sum() / num_tokens
    with torch.no_grad():
        approx_kl = (((ratio - 1) - logratio) * token_mask).sum() / num_tokens  # k3 estimator
        clipfrac = ((((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float()) * token_mask).sum() / num_tokens
    return loss, approx_kl, clipfrac


# ---------------------------------------------------------------------------------------------------------------
# Rollout: run N episodes to the end, storing every policy query
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(policy, processor, envs, task_ids, init_ids, temperature, stats, action_tokenizer, device, autocast,
            record_frames):
    N, max_queries = envs.num_envs, math.ceil(envs.max_steps / CHUNK_STEPS)
    images, instructions = envs.reset(task_ids, init_ids, record_frames)  # (N, 224, 224, 3) uint8
    input_ids, attention_mask = processor.prompt_ids(instructions, device)  # (N, L)
    obs_images = np.zeros((max_queries, N, *images.shape[1:]), dtype=np.uint8)  # (Q, N, 224, 224, 3)
    action_bins = torch.zeros((max_queries, N, NUM_ACTION_TOKENS), dtype=torch.long)  # (Q, N, 56)
    logprobs = torch.zeros((max_queries, N, NUM_ACTION_TOKENS))  # (Q, N, 56)
    token_mask = torch.zeros((max_queries, N, NUM_ACTION_TOKENS), dtype=torch.bool)  # executed actions only
    success, done, lengths = np.zeros(N, bool), np.zeros(N, bool), np.zeros(N, int)
    policy_s = 0.0
    for q in range(max_queries):
        live = np.flatnonzero(~done)  # only envs still running are queried
        if len(live) == 0:
            break
        t_policy = time.time()
        pixel_values = processor.preprocess_images(torch.from_numpy(images[live]).to(device))
        with autocast:
            logits = policy(input_ids[live], attention_mask[live], pixel_values).float()  # (n, 56, 256)
        # ALGO LOGIC: sample each of the 56 tokens from softmax(bin logits / T); its log-prob under the same law
        logp_all = bin_logprobs(logits, temperature if temperature > 0 else 1.0)
        bins = torch.distributions.Categorical(logits=logp_all).sample() if temperature > 0 else logits.argmax(-1)
        env_actions = np.zeros((N, CHUNK_STEPS, ACTION_DIM))
        env_actions[live] = to_libero_actions(bins_to_actions(bins, policy, action_tokenizer, stats))
        policy_s += time.time() - t_policy
        obs_images[q] = images
        action_bins[q, live] = bins.cpu()
        logprobs[q, live] = logp_all.gather(-1, bins[..., None]).squeeze(-1).cpu()
        images, success, done, executed = envs.step(env_actions)  # all 8 actions of the chunk, unless it ends
        token_mask[q] = torch.arange(NUM_ACTION_TOKENS)[None] // ACTION_DIM < torch.from_numpy(executed)[:, None]
        lengths += executed
    return dict(images=obs_images, bins=action_bins, logprobs=logprobs, token_mask=token_mask,
                instructions=instructions, success=success.copy(), lengths=lengths, policy_s=policy_s)


def evaluate(policy, processor, envs, tasks, args, stats, action_tokenizer, dist, autocast, logger, step) -> dict:
    """Every task x its first `eval_init_states` init states, split over ranks; per-task and suite success."""
    episodes = [(t, i) for t in args.task_ids for i in range(args.eval_init_states)]
    mine = episodes[dist.rank::dist.world_size]
    successes = torch.zeros(len(tasks), dtype=torch.float64)
    counts = torch.zeros(len(tasks), dtype=torch.float64)
    lengths = torch.zeros(len(tasks), dtype=torch.float64)
    videos = {}
    for start in range(0, len(mine), envs.num_envs):
        wave = mine[start:start + envs.num_envs]
        padded = wave + [wave[-1]] * (envs.num_envs - len(wave))  # idle envs repeat the last episode
        out = rollout(policy, processor, envs, [t for t, _ in padded], [i for _, i in padded], args.eval_temperature,
                      stats, action_tokenizer, dist.device, autocast,
                      record_frames=dist.is_main and args.capture_video and len(videos) < 2)
        for k, (task_id, _) in enumerate(wave):
            successes[task_id] += float(out["success"][k])
            lengths[task_id] += float(out["lengths"][k])
            counts[task_id] += 1
        if dist.is_main and args.capture_video and len(videos) < 2:
            wave_videos = envs.videos()
            for k in range(len(wave)):
                videos.setdefault("success" if out["success"][k] else "failure", wave_videos[k])
    totals = torch.stack([successes, lengths, counts]).to(dist.device)  # (3, num_tasks)
    successes, lengths, counts = all_reduce_sum_(totals).cpu()
    suite_success = (successes.sum() / counts.sum()).item()
    metrics = {"eval/success_rate": suite_success, "eval/episode_length": (lengths.sum() / counts.sum()).item(),
               f"eval/{args.suite}/success_rate": suite_success}
    for task_id in args.task_ids:
        metrics[f"eval/{args.suite}/task_{task_id:02d}_success_rate"] = (successes[task_id] / counts[task_id]).item()
    for key, frames in videos.items():
        logger.video(f"eval/video_{key}", frames, step, fps=20)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: LoRA adapter (or the full model in the OFT layout) + trainer state
# ---------------------------------------------------------------------------------------------------------------
def save_policy(policy: OFTPolicy, processor, lora_config: Optional[LoraConfig], model_dir: str, directory: str) -> None:
    """LoRA: adapter_model.safetensors + adapter_config.json; full fine-tuning: the OFT layout under model/."""
    if lora_config is not None:
        save_file(get_peft_model_state_dict(policy.vla), os.path.join(directory, "adapter_model.safetensors"))
        lora_config.save_pretrained(directory)
    else:
        save_openvla(policy.vla, processor, os.path.join(directory, "model"))
        stats_file = os.path.join(model_dir, "dataset_statistics.json")
        if os.path.isfile(stats_file):
            shutil.copy(stats_file, os.path.join(directory, "model"))


def validate(args: Args):
    """Every check that can fail on user input, before envs or weights are loaded. Returns the suite's tasks."""
    tasks = load_suite(args.suite)  # unknown suite / missing assets
    args.task_ids = list(range(len(tasks))) if args.task_ids is None else args.task_ids
    check_task_ids(tasks, args.task_ids, args.suite)
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.eval_only and args.resume:
        raise ValueError("--eval-only evaluates --checkpoint; do not combine it with --resume")
    if args.checkpoint and not args.eval_only:
        raise ValueError("--checkpoint is for --eval-only; use --resume to continue training")
    if args.resume:
        args.resume = resolve_checkpoint(args.resume, "--resume")
    if args.checkpoint:
        args.checkpoint = resolve_checkpoint(args.checkpoint, "--checkpoint")
        saved = load_trainer_state(args.checkpoint)["args"]  # evaluate the model the checkpoint was trained from
        for key in ("model_path", "unnorm_key", "lora_rank", "lora_alpha"):
            setattr(args, key, saved[key])
    args.model_path = resolve_model_path(args.model_path)
    load_action_stats(args.model_path, read_openvla_config(args.model_path), args.suite, args.unnorm_key)
    if args.reward == "progress" and not args.eval_only:
        check_world_model(args.world_model_path)
    configure_rendering(args.mujoco_gl)  # no rendering backend -> error now
    return tasks


def main(args: Args) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # Setup: distributed, sizes, seeds, env, model, reward model, optimizer
    # ------------------------------------------------------------------------------------------------------------
    dist = init_dist()
    tasks = validate(args)
    if args.tasks_per_step % dist.world_size:
        raise ValueError(f"--tasks-per-step {args.tasks_per_step} must be divisible by the world size {dist.world_size}")
    groups_per_rank = args.tasks_per_step // dist.world_size
    rollouts_per_rank = groups_per_rank * args.group_size
    if rollouts_per_rank % args.num_envs:
        raise ValueError(f"--tasks-per-step / world size x --group-size = {rollouts_per_rank} rollouts per rank must be "
                         f"divisible by --num-envs {args.num_envs}")
    run_path = os.path.join(args.run_dir, f"{args.exp_name}__s{args.seed}")
    print0(f"run {run_path}: {dist.world_size} rank(s) x {args.num_envs} envs, {args.tasks_per_step} groups x "
           f"{args.group_size} rollouts per step")

    torch.manual_seed(args.seed)  # identical initial weights (LoRA) on every rank
    np.random.seed(args.seed + dist.rank)
    on_gpu = dist.device.type == "cuda"
    dtype = torch.bfloat16 if (on_gpu and args.bf16 and args.lora_rank > 0) else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (on_gpu and args.bf16) else nullcontext()
    model_dir = args.model_path
    if args.lora_rank == 0 and (args.resume or args.checkpoint):
        model_dir = os.path.join(args.resume or args.checkpoint, "model")
    vla, processor = load_openvla(model_dir, device=dist.device, dtype=dtype, attn_implementation="sdpa")
    stats = load_action_stats(model_dir, vla.config, args.suite, args.unnorm_key)
    action_tokenizer = ActionTokenizer(vla.vocab_size, N_BINS)
    lora_config = make_trainable(vla, args.lora_rank, args.lora_alpha)  # None = full fine-tuning
    if args.gradient_checkpointing:
        vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = OFTPolicy(vla, processor.tokenizer.eos_token_id).to(dist.device).eval()  # no dropout anywhere
    trainable = [p for p in policy.parameters() if p.requires_grad]
    broadcast_parameters(policy)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    print0(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in policy.parameters()):,}")

    embedder = None
    if args.reward == "progress" and not args.eval_only:
        embedder = VideoEmbedder(args.world_model_path, dist.device, torch.bfloat16 if on_gpu and args.bf16 else torch.float32,
                                 args.world_model_frames, args.world_model_offload)

    start_step = 0
    if lora_config is not None and (args.resume or args.checkpoint):
        set_peft_model_state_dict(vla, load_file(os.path.join(args.resume or args.checkpoint, "adapter_model.safetensors")))
    if args.resume:
        state = load_trainer_state(args.resume)
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state)
        start_step = state["step"]
        print0(f"resumed from {args.resume} at step {start_step}")
    logger = Logger(run_path, args, enabled=dist.is_main)

    envs = LiberoVectorEnv(args.suite, args.num_envs, camera_size=args.camera_size, max_steps=args.max_episode_steps,
                           use_workers=args.env_workers, gpu_id=dist.local_rank if on_gpu else -1,
                           seed=args.seed + dist.rank * args.num_envs)

    if args.eval_only:
        metrics = evaluate(policy, processor, envs, tasks, args, stats, action_tokenizer, dist, autocast, logger, start_step)
        print0(json.dumps(metrics))
        logger.close()
        envs.close()
        cleanup()
        return

    def save(step: int) -> None:
        check_in_sync(trainable)  # the gradient all-reduce keeps ranks identical; verify before writing rank 0's copy
        if dist.is_main:
            def write(directory: str) -> None:
                save_policy(policy, processor, lora_config, model_dir, directory)
                save_trainer_state(directory, trainer_state(args, step, optimizer))
            path = save_checkpoint(os.path.join(run_path, "checkpoints"), step, write, keep_last=args.keep_checkpoints)
            print0(f"saved {path}")
        if is_dist():
            torch_dist.barrier()

    for step in range(start_step + 1, args.total_steps + 1):
        t_step = time.time()
        # --------------------------------------------------------------------------------------------------------
        # 1. Rollout: this rank's groups, `group_size` episodes each, in waves of num_envs envs
        # --------------------------------------------------------------------------------------------------------
        task_rng = np.random.default_rng([args.seed, step])  # the same global draw on every rank
        groups = [(int(task_rng.choice(args.task_ids)), int(task_rng.integers(len(tasks[0].init_states))))
                  for _ in range(args.tasks_per_step)][dist.rank * groups_per_rank:(dist.rank + 1) * groups_per_rank]
        episodes = [g for g in groups for _ in range(args.group_size)]  # (R,) rollout r belongs to group r // group_size
        torch.manual_seed(args.seed * 1_000_003 + step * 1009 + dist.rank)  # action sampling, reproducible on resume
        waves, embeddings, env_steps = [], [], 0
        for start in range(0, rollouts_per_rank, args.num_envs):
            wave = episodes[start:start + args.num_envs]
            out = rollout(policy, processor, envs, [t for t, _ in wave], [i for _, i in wave], args.temperature,
                          stats, action_tokenizer, dist.device, autocast, record_frames=embedder is not None)
            env_steps += int(out["lengths"].sum())
            if embedder is not None:
                embeddings.append(embedder(envs.videos()))  # (num_envs, hidden)
            waves.append(out)
        success = np.concatenate([w["success"] for w in waves])  # (R,)
        lengths = np.concatenate([w["lengths"] for w in waves])
        t_rollout = time.time() - t_step

        # --------------------------------------------------------------------------------------------------------
        # 2. Reward: dynamic sampling over groups, then success 1 / progress reward (global per-task pools)
        # --------------------------------------------------------------------------------------------------------
        t_reward = time.time()
        keep_group = (keep_groups(success, args.group_size, args.success_bounds) if args.dynamic_sampling
                      else np.ones(groups_per_rank, bool))  # (G,)
        keep = np.repeat(keep_group, args.group_size)  # (R,)
        task_of = np.array([t for t, _ in episodes])
        rewards = success.astype(np.float64)  # failures 0 unless shaped
        num_clusters, progress_mean = 0, 0.0
        if embedder is not None:
            all_emb = all_gather_cat(torch.cat(embeddings), dist.device).numpy()  # (world * R, hidden)
            all_success = all_gather_cat(torch.from_numpy(success.astype(np.int64)), dist.device).numpy().astype(bool)
            all_task = all_gather_cat(torch.from_numpy(task_of), dist.device).numpy()
            all_keep = all_gather_cat(torch.from_numpy(keep.astype(np.int64)), dist.device).numpy().astype(bool)
            pooled = np.flatnonzero(all_keep)  # the reward sees only kept groups, as the anchor does
            all_rewards = np.zeros(len(all_success))
            all_rewards[pooled], num_clusters = progress_rewards(
                all_emb[pooled], all_success[pooled], all_task[pooled], args.progress_variant, args.paper_alpha)
            rewards = np.where(keep, all_rewards[dist.rank * rollouts_per_rank:(dist.rank + 1) * rollouts_per_rank], rewards)
            failed = pooled[~all_success[pooled]]
            progress_mean = float(all_rewards[failed].mean()) if len(failed) else 0.0
        t_reward = time.time() - t_reward

        # --------------------------------------------------------------------------------------------------------
        # 3. Advantage: GRPO, group-normalised, broadcast to every action token of the rollout
        # --------------------------------------------------------------------------------------------------------
        scores = torch.from_numpy(args.reward_coef * rewards).view(groups_per_rank, args.group_size)  # (G, n)
        advantages = grpo_advantages(scores).flatten().float()  # (R,)

        # Flatten the kept rollouts' policy queries into training samples (query q of rollout r)
        samples = []
        for w, out in enumerate(waves):
            for n in range(args.num_envs):
                r = w * args.num_envs + n
                if keep[r]:
                    for q in np.flatnonzero(out["token_mask"][:, n].any(-1).numpy()):
                        samples.append((w, int(q), n, r))
        num_kept = torch.tensor([float(len(samples))], device=dist.device)
        all_reduce_sum_(num_kept)

        # --------------------------------------------------------------------------------------------------------
        # 4. Update: clipped token-mean surrogate over the 56 per-token ratios
        # --------------------------------------------------------------------------------------------------------
        t_update = time.time()
        stats_sum = {k: 0.0 for k in ("loss", "entropy", "approx_kl", "clipfrac", "ratio_max")}
        grad_norm, num_updates = 0.0, 0
        if num_kept.item() > 0:
            order = torch.randperm(len(samples)).tolist()
            for mb in range(args.num_minibatches):
                mb_samples = [samples[i] for i in order[mb::args.num_minibatches]]
                tokens = torch.tensor([float(sum(int(waves[w]["token_mask"][q, n].sum()) for w, q, n, _ in mb_samples))],
                                      device=dist.device)
                all_reduce_sum_(tokens)  # global token count: the loss is a token-mean over all ranks
                for p in trainable:  # zeros, not None: a rank without samples still joins the all-reduce
                    p.grad = torch.zeros_like(p)
                for mstart in range(0, len(mb_samples), args.micro_batch_size):
                    micro = mb_samples[mstart:mstart + args.micro_batch_size]
                    images = torch.from_numpy(np.stack([waves[w]["images"][q, n] for w, q, n, _ in micro])).to(dist.device)
                    input_ids, attention_mask = processor.prompt_ids([waves[w]["instructions"][n] for w, _, n, _ in micro], dist.device)
                    bins = torch.stack([waves[w]["bins"][q, n] for w, q, n, _ in micro]).to(dist.device)  # (b, 56)
                    old_logprob = torch.stack([waves[w]["logprobs"][q, n] for w, q, n, _ in micro]).to(dist.device)
                    tmask = torch.stack([waves[w]["token_mask"][q, n] for w, q, n, _ in micro]).to(dist.device).float()
                    adv = advantages[[r for _, _, _, r in micro]].to(dist.device)[:, None]  # (b, 1)
                    with autocast:
                        logits = policy(input_ids, attention_mask, processor.preprocess_images(images)).float()
                    # ALGO LOGIC: per-token ratio under the rollout's law (bin slice, temperature)
                    logp_all = bin_logprobs(logits, args.temperature)  # (b, 56, 256)
                    new_logprob = logp_all.gather(-1, bins[..., None]).squeeze(-1)  # (b, 56)
                    loss, approx_kl, clipfrac = clipped_token_loss(new_logprob, old_logprob, adv, tmask, args.clip_low,
                                                                   args.clip_high, tokens.item())
                    loss.backward()
                    with torch.no_grad():
                        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (b, 56)
                        stats_sum["loss"] += loss.item()
                        stats_sum["entropy"] += (entropy * tmask).sum().item() / tokens.item()
                        stats_sum["approx_kl"] += approx_kl.item()
                        stats_sum["clipfrac"] += clipfrac.item()
                        ratio = (new_logprob - old_logprob).exp()
                        stats_sum["ratio_max"] = max(stats_sum["ratio_max"], (ratio * tmask).max().item())
                sum_gradients_(trainable)  # over ranks (DDP-equivalent; ranks may hold different sample counts)
                grad_norm += nn.utils.clip_grad_norm_(trainable, args.max_grad_norm).item()
                optimizer.step()
                num_updates += 1
        t_update = time.time() - t_update

        # --------------------------------------------------------------------------------------------------------
        # 5. Log, evaluate, checkpoint
        # --------------------------------------------------------------------------------------------------------
        num_updates = max(num_updates, 1)
        policy_s = sum(w["policy_s"] for w in waves)
        metrics = {
            "actor/loss": stats_sum["loss"] / num_updates,
            "actor/entropy": stats_sum["entropy"] / num_updates,
            "actor/approx_kl": stats_sum["approx_kl"] / num_updates,
            "actor/clipfrac": stats_sum["clipfrac"] / num_updates,
            "actor/ratio_max": stats_sum["ratio_max"],
            "actor/grad_norm": grad_norm / num_updates,
            "actor/lr": optimizer.param_groups[0]["lr"],
            "rollout/success_rate": float(success.mean()),
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/episode_length": float(lengths.mean()),
            "rollout/episodes": float(len(success)),
            "rollout/kept_groups_frac": float(keep_group.mean()),
            "rollout/advantage_abs_mean": float(advantages[torch.from_numpy(keep)].abs().mean()) if keep.any() else 0.0,
            "reward/progress_mean": progress_mean,
            "reward/num_clusters": float(num_clusters),
            "time/rollout_s": t_rollout,
            "time/reward_s": t_reward,
            "time/update_s": t_update,
            "time/env_steps_per_s": env_steps / t_rollout,
            "time/actions_per_s": env_steps / max(policy_s, 1e-9),
            "time/update_samples_per_s": len(samples) / max(t_update, 1e-9),
        }
        metrics = all_reduce_mean(metrics)
        for key in ("time/env_steps_per_s", "time/actions_per_s", "time/update_samples_per_s",  # totals over ranks
                    "actor/loss", "actor/entropy", "actor/approx_kl", "actor/clipfrac"):  # rank shares of global means
            metrics[key] *= dist.world_size
        if args.eval_interval and (step % args.eval_interval == 0 or step == args.total_steps):
            metrics.update(evaluate(policy, processor, envs, tasks, args, stats, action_tokenizer, dist, autocast, logger, step))
        logger.log(metrics, step)
        print0(f"step {step}: success {metrics['rollout/success_rate']:.3f} reward {metrics['rollout/reward_mean']:.3f} "
               f"kept {metrics['rollout/kept_groups_frac']:.2f} loss {metrics['actor/loss']:.4f} "
               f"env steps/s {metrics['time/env_steps_per_s']:.1f} step {time.time() - t_step:.1f}s"
               + (f" eval {metrics['eval/success_rate']:.3f}" if "eval/success_rate" in metrics else ""))
        if args.save_interval and (step % args.save_interval == 0 or step == args.total_steps):
            save(step)

    logger.close()
    envs.close()
    cleanup()


if __name__ == "__main__":
    main(tyro.cli(Args))
