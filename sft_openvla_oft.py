"""Supervised fine-tuning of OpenVLA-OFT ("AC-PD": action chunks, parallel decoding) on demonstrations: the start
srpo_openvla_oft.py trains from, made from your own data.

Every demo step t whose next 8 actions lie inside its episode (t = 0 .. T - 8) becomes one sample: the camera image,
OpenVLA's prompt ("In: What action should the robot take to {instruction}?\\nOut:") and the chunk a_t .. a_{t+7} as
8 x 7 = 56 target action tokens, predicted in ONE forward pass of srpo_openvla_oft.py's `OFTPolicy` (zero input
embeddings at the 56 action slots, bidirectional attention):

    1. gripper into OpenVLA's convention: LIBERO's command g in {-1 open, +1 close} becomes 1 - clip(g, 0, 1) in
       {0 close, 1 open} (openvla's `libero_dataset_transform`), left un-normalised (mask False);
    2. the 6 pose dims normalised with the data's 1st/99th percentiles, clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1,
       -1, 1) (openvla-oft's BOUNDS_Q99 for LIBERO);
    3. binned with `ActionTokenizer.normalized_to_tokens` (256 bins on the last 256 vocabulary tokens).

The loss is the cross-entropy of each of the 56 slots over its 256 bins (the law srpo_openvla_oft.py samples from),
averaged over slots and samples. The statistics go to the final checkpoint's dataset_statistics.json under
--unnorm-key (default `{suite}_no_noops`, the key of openvla-oft's LIBERO datasets), the chunk size (8) and action
dimension (7) are srpo_openvla_oft.py's constants (openvla-oft keeps them in `prismatic/vla/constants.py`, not in the
checkpoint), and the final model, LoRA merged into the base weights, is written in the openvla-7b layout at
{run_dir}/{exp_name}__s{seed}/final/: `srpo_openvla_oft.py --model-path .../final` loads it unchanged.

Data (--dataset, one or more): LeRobot v3.0 datasets (local folders or hub ids; the camera and action features
named by --dataset-image-key / --dataset-action-key, the instruction from each episode's task). Images are the
policy's 224 x 224 input: frames of another size are resized with antialiased Lanczos-3, as openvla-oft's RLDS loader
resizes its JPEG-decoded frames (the JPEG round trip the LIBERO evaluation applies to fresh renders is already in the
frames of datasets converted from RLDS), then, with --center-crop, the 0.9-area center crop the evaluation applies.
Their orientation is the dataset's: LIBERO datasets made for OpenVLA and openpi store the agentview camera already
turned upright (flipped 180 degrees), as the policy sees it.

Anchor: openvla-oft's `vla-scripts/finetune.py` with discrete action tokens and parallel decoding (lr 5e-4, LoRA rank
32, dropout 0, every linear layer; chunking as its RLDS `chunk_act_obs`). Departures:
- the loss is over the 256 bins of each slot, not the full vocabulary with the </s> target;
- images are not augmented (openvla-oft trains with random crops and colour jitter, and evaluates center-cropped);
- batches walk a fresh permutation of all samples per epoch, seeded by (seed, epoch), each rank taking its slice of
  every global batch, so a resumed run sees exactly the batches an uninterrupted one would;
- evaluation is srpo_openvla_oft.py's own (`evaluate`: every task x its first --eval-init-states, greedy).

Run:
    python sft_openvla_oft.py --dataset lerobot/libero_spatial_image --model-path openvla/openvla-7b \\
        --suite libero_spatial --num-epochs 20
    torchrun --nproc-per-node 8 sft_openvla_oft.py --dataset DATASET --suite libero_spatial
    python srpo_openvla_oft.py --model-path runs/sft_openvla_oft__s1/final --suite libero_spatial
    python sft_openvla_oft.py --eval-only --checkpoint runs/sft_openvla_oft__s1/checkpoints --dataset DATASET \\
        --suite libero_spatial
"""

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP

from common import fsdp
from common.checkpoint import check_run_flags
from common.dist import all_reduce_mean, bf16_autocast, broadcast_parameters, init_dist, print0
from common.envs.demos import action_norm_stats
from common.envs.lerobot_dataset import ACTION_KEY, IMAGE_KEY, LeRobotEpisodes, resolve_dataset
from common.envs.libero import (
    OFT_EVAL_MAX_STEPS,
    LiberoVectorEnv,
    check_task_ids,
    configure_rendering,
    load_suite,
    to_libero_actions,
)
from common.envs.libero_image import crop_center, resize_lanczos3
from common.guards import check_flags
from common.logger import Logger, check_tracking
from common.models.openvla import (
    ActionTokenizer,
    load_lora_adapter,
    load_openvla,
    make_trainable,
    merge_lora,
    read_openvla_config,
    resolve_model_path,
    save_lora_adapter,
    save_openvla,
)
from common.run import RunShell, batch_indices, resume_training
from srpo_openvla_oft import (  # the RL script's policy, decoding and evaluation
    ACTION_DIM,
    CHUNK_STEPS,
    EVAL_PROTOCOL_FLAGS,
    N_BINS,
    NUM_ACTION_TOKENS,
    OFTPolicy,
    bins_to_actions,
    evaluate,
)

IMAGE_SIZE = 224


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "sft_openvla_oft"
    """name of the run; logs, checkpoints and the final model go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds torch (LoRA init) and the batch order"""
    # --- model ---
    model_path: str = "openvla/openvla-7b"
    """OpenVLA checkpoint to start from: a local directory in the openvla-7b layout or a hub id"""
    unnorm_key: Optional[str] = None
    """dataset_statistics.json key the action statistics are saved under (default: {suite}_no_noops)"""
    lora_rank: int = 32
    """LoRA rank on every linear layer but the LM head; 0 = full fine-tuning"""
    lora_alpha: int = 16
    """LoRA scaling numerator (the adapter is scaled by alpha / rank)"""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (saves memory, costs ~30% time)"""
    bf16: bool = True
    """on GPU: bfloat16 weights for the frozen base under LoRA, and bf16 autocast (ignored on CPU)"""
    fsdp: Literal["auto", "on", "off"] = "auto"
    """FSDP2: shard weights, gradients and AdamW state over ranks (auto: on for full fine-tuning, --lora-rank 0, with
    more than one rank)"""
    # --- data ---
    dataset: tuple[str, ...] = tyro.MISSING
    """LeRobot v3.0 datasets: local folders or hub ids (every sample is held in memory)"""
    dataset_image_key: str = IMAGE_KEY
    """LeRobot feature of the camera the policy sees"""
    dataset_action_key: str = ACTION_KEY
    """LeRobot feature of the actions (7 dims: 6 pose deltas, gripper)"""
    gripper: Literal["libero", "unit"] = "libero"
    """the data's gripper values: libero = LIBERO's commands (-1 open, +1 close); unit = already OpenVLA's (0 close,
    1 open)"""
    # --- environment (evaluation: srpo_openvla_oft.py's) ---
    suite: str = "libero_spatial"
    """LIBERO suite the data comes from and the evaluation runs on"""
    task_ids: Optional[list[int]] = None
    """task ids of the suite to evaluate on (default: all)"""
    num_envs: int = 16
    """parallel LIBERO envs per rank at evaluation (0: no simulator evaluation)"""
    max_episode_steps: int = 512
    """env steps per evaluation episode (a query executes 8)"""
    oft_eval_max_steps: bool = False
    """use the OpenVLA-OFT paper's evaluation limits instead (220/280/300/520/400 env steps by suite)"""
    center_crop: bool = True
    """the central 0.9-area crop (then back to 224) on the training images and at evaluation, as OpenVLA-OFT
    evaluates; off for data recorded already cropped"""
    env_max_restarts: int = 2
    """restart a dead LIBERO worker and redo its episode at most this many times per call"""
    camera_size: int = 256
    """agentview render resolution before the resize to 224 (evaluation)"""
    env_workers: bool = True
    """run each env in a subprocess (False: step them one after another in this process)"""
    pipeline_stages: int = 2
    """evaluation: split the envs into this many groups, the policy acting for one while the others simulate (as in
    srpo_openvla_oft.py; 1: act for all, then step all)"""
    mujoco_gl: Optional[str] = None
    """MuJoCo rendering backend: egl or osmesa (default: MUJOCO_GL, else egl with a GPU, osmesa without)"""
    # --- algorithm: SFT ---
    total_iterations: int = 1000
    """optimizer steps (ignored when --num-epochs is set)"""
    num_epochs: Optional[float] = None
    """train for this many passes over the samples: total_iterations = ceil(epochs x samples / global batch)"""
    batch_size: int = 8
    """samples per rank per optimizer step (openvla-oft: 8)"""
    learning_rate: float = 5e-4
    """AdamW learning rate (constant)"""
    micro_batch_size: int = 8
    """samples per forward/backward; a batch accumulates gradients over micro-batches"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    # --- eval, logging, checkpoints ---
    eval_interval: int = 500
    """evaluate every this many iterations and after the last one (0: only after the last one)"""
    eval_init_states: int = 50
    """init states per task in evaluation (the suite's first ones)"""
    eval_temperature: float = 0.0
    """0 = greedy (argmax over the bins)"""
    capture_video: bool = False
    """save one successful and one failed evaluation episode as mp4 per evaluation"""
    track: bool = False
    """mirror the TensorBoard scalars, the hyperparameters and the eval videos to Weights & Biases (pip install wandb;
    WANDB_MODE=offline on a node without network)"""
    wandb_project_name: str = "vla-rl"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B team or user of --track (default: your own)"""
    save_interval: int = 500
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
    global_batch_size: tyro.conf.Suppress[int] = 0
    """samples per optimizer step over all ranks (batch_size x world size)"""
    num_samples: tyro.conf.Suppress[int] = 0
    """training samples (demo steps with a full chunk ahead) in all --dataset entries"""


def validate(args: Args, world_size: int) -> str:
    """Every check that can fail on user input, before envs or weights are loaded. Returns the run directory."""
    check_tracking(args)  # --track without wandb installed
    check_flags(
        args,
        positive=("batch_size", "micro_batch_size", "max_episode_steps", "eval_init_states", "pipeline_stages"),
        non_negative=("num_envs", "eval_interval", "save_interval", "keep_checkpoints", "eval_temperature"),
    )
    if args.batch_size % args.micro_batch_size:
        raise ValueError(
            f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch-size ({args.micro_batch_size})"
        )
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.eval_only and args.num_envs == 0:
        raise ValueError("--eval-only evaluates in the simulator: --num-envs must be >= 1")

    fsdp.use_fsdp(args.fsdp, args.lora_rank, world_size)  # --fsdp on with LoRA -> error now
    tasks = load_suite(args.suite)  # unknown suite / missing assets
    args.task_ids = list(range(len(tasks))) if args.task_ids is None else args.task_ids
    check_task_ids(tasks, args.task_ids, args.suite)
    args.dataset = tuple(resolve_dataset(path, "--dataset") for path in args.dataset)  # hub ids downloaded
    args.unnorm_key = args.unnorm_key or f"{args.suite}_no_noops"
    run_path = check_run_flags(
        args, "sft_openvla_oft.py", inherited=("model_path", "unnorm_key", "lora_rank", "lora_alpha")
    )
    args.model_path = resolve_model_path(args.model_path)
    read_openvla_config(args.model_path)
    args.global_batch_size = args.batch_size * world_size
    if args.num_envs > 0:
        configure_rendering(args.mujoco_gl)  # no rendering backend -> error now
    return run_path


# ---------------------------------------------------------------------------------------------------------------
# Data: demo chunks -> 56 target bins, every sample in memory; batches: common/run.py batch_indices
# ---------------------------------------------------------------------------------------------------------------
def read_episodes(path: str, args: Args) -> list[dict]:
    """The episodes of one dataset: rgb (T, H, W, 3) uint8, action (T, 7), instruction."""
    episodes = LeRobotEpisodes(path, args.dataset_image_key, None, args.dataset_action_key)
    return [episodes[i] for i in range(len(episodes))]


def policy_images(frames: np.ndarray, center_crop: bool) -> np.ndarray:
    """(T, H, W, 3) uint8 dataset frames -> the policy's (T, 224, 224, 3): Lanczos-3 resize when not 224 already,
    then the optional 0.9-area center crop."""
    out = []
    for frame in frames:
        if frame.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            frame = resize_lanczos3(np.ascontiguousarray(frame), IMAGE_SIZE)
        out.append(crop_center(frame) if center_crop else frame)
    return np.stack(out)


def to_model_actions(actions: torch.Tensor, gripper: str) -> torch.Tensor:
    """(N, 7) data actions -> OpenVLA's convention, gripper 0 close / 1 open."""
    g = actions[:, 6:]
    g = 1 - g.clamp(0, 1) if gripper == "libero" else g
    return torch.cat([actions[:, :6], g], dim=1)


def chunk_starts(length: int) -> np.ndarray:
    """The steps of an episode whose chunk of CHUNK_STEPS actions lies inside it (openvla-oft's `chunk_act_obs`
    keeps traj_len - (K - 1) of them)."""
    return np.arange(max(length - CHUNK_STEPS + 1, 0))


def load_samples(args: Args, action_tokenizer: ActionTokenizer) -> tuple[dict, dict]:
    """All samples of all --dataset entries -> (samples, dataset_statistics entry). samples: rgb (N, 224, 224, 3)
    uint8, bins (N, 56) target bin indices, instructions (N,). The entry is `action_norm_stats` of every action of
    every episode in the model's convention."""
    episodes = [e for path in args.dataset for e in read_episodes(path, args)]
    if episodes and episodes[0]["action"].shape[1] != ACTION_DIM:
        raise ValueError(
            f"--dataset-action-key {args.dataset_action_key!r} has {episodes[0]['action'].shape[1]} dims, not "
            f"{ACTION_DIM}"
        )
    actions = [to_model_actions(torch.from_numpy(e["action"]).float(), args.gripper) for e in episodes]
    norm_stats = action_norm_stats([{"action": a.numpy()} for a in actions])
    stats = norm_stats["action"]
    rgb, bins, instructions = [], [], []
    for episode, action in zip(episodes, actions):
        starts = chunk_starts(len(action))
        if len(starts) == 0:
            continue
        tokens = action_tokenizer.normalized_to_tokens(ActionTokenizer.normalize(action, stats))  # (T, 7)
        chunks = torch.stack([tokens[t : t + CHUNK_STEPS].flatten() for t in starts])  # (n, 56)
        bins.append(chunks - action_tokenizer.first_token)
        rgb.append(policy_images(episode["rgb"][starts], args.center_crop))
        instructions += [episode["instruction"]] * len(starts)
    if not bins:
        raise ValueError(f"--dataset {list(args.dataset)}: no episode has {CHUNK_STEPS} or more steps")
    samples = dict(rgb=torch.from_numpy(np.concatenate(rgb)), bins=torch.cat(bins), instructions=instructions)
    return samples, norm_stats


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: cross-entropy of the 56 parallel-decoded slots over their 256 bins
# ---------------------------------------------------------------------------------------------------------------
def chunk_loss(policy, prompt_ids, prompt_mask, pixel_values, target_bins) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the 56 slots and the batch; stats summed over the batch: bin_correct (greedy bin =
    target), chunk_correct (all 56 right), l1 (summed |greedy bin - target bin| x 2 / 255, in normalised units)."""
    logits = policy(prompt_ids, prompt_mask, pixel_values).float()  # (B, 56, 256)
    loss = F.cross_entropy(logits.flatten(0, 1), target_bins.flatten())
    with torch.no_grad():
        hit = logits.argmax(-1) == target_bins
        stats = {
            "bin_correct": hit.sum().item(),
            "chunk_correct": hit.all(1).sum().item(),
            "l1": ((logits.argmax(-1) - target_bins).abs().sum() * 2 / (N_BINS - 1)).item(),
        }
    return loss, stats


def dataset_statistics(norm_stats: dict, unnorm_key: str) -> dict:
    """openvla-oft's dataset_statistics.json: {key: {action: {mean, std, max, min, q01, q99, mask}, proprio,
    num_transitions, num_trajectories}}; the AC-PD policy reads no proprio, so its entry is all zeros."""
    zeros = [0.0] * ACTION_DIM
    proprio = {k: zeros for k in ("mean", "std", "max", "min", "q01", "q99")}
    return {unnorm_key: {**norm_stats, "proprio": proprio}}


def main(args: Args) -> None:
    # ---------------------------------------------------------------------------------------------------------------
    # Setup: validation, distributed, seeds, model, optimizer, data, envs
    # ---------------------------------------------------------------------------------------------------------------
    dist = init_dist(args.dist_timeout_s)
    run_path = validate(args, dist.world_size)
    device = dist.device
    checkpoint_dir = args.resume or args.checkpoint
    torch.manual_seed(args.seed)  # identical LoRA init on every rank
    dtype = torch.bfloat16 if (device.type == "cuda" and args.bf16 and args.lora_rank > 0) else torch.float32
    autocast = bf16_autocast(device, args.bf16)
    model_dir = os.path.join(checkpoint_dir, "model") if checkpoint_dir and args.lora_rank == 0 else args.model_path
    sharded = fsdp.use_fsdp(args.fsdp, args.lora_rank, dist.world_size)  # FSDP2 moves each shard to the GPU itself
    # SDPA: the bidirectional mask is not expressible in flash-attention's causal kernel
    vla, processor = load_openvla(
        model_dir, device="cpu" if sharded else device, dtype=dtype, attn_implementation="sdpa"
    )
    if args.gradient_checkpointing:
        vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = make_trainable(vla, args.lora_rank, args.lora_alpha)  # None = full fine-tuning
    if checkpoint_dir and lora_config is not None:
        load_lora_adapter(vla, checkpoint_dir)
    action_tokenizer = ActionTokenizer(vla.vocab_size, N_BINS)
    policy = OFTPolicy(vla, processor.tokenizer.eos_token_id)
    if sharded:  # per decoder layer and ViT block, then the root; gradients averaged over ranks
        fsdp.shard_model(policy, reduce="mean")
    else:
        broadcast_parameters(policy.to(device))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    start_iteration = resume_training(args, policy, optimizer, sharded)
    ddp_policy = DDP(policy) if dist.world_size > 1 and not sharded else policy

    data, norm_stats = load_samples(args, action_tokenizer)
    stats = norm_stats["action"]
    args.num_samples = len(data["bins"])
    if args.num_epochs is not None:
        args.total_iterations = math.ceil(args.num_epochs * args.num_samples / args.global_batch_size)
    if args.total_iterations < 1:
        raise ValueError("--total-iterations (or --num-epochs) must give at least one optimizer step")

    def env_action(bins: torch.Tensor) -> np.ndarray:
        """(n, 56) bins -> (n, 8, 7) LIBERO commands, un-normalised with this data's statistics."""
        return to_libero_actions(bins_to_actions(bins, policy, action_tokenizer, stats))

    envs = None
    if args.num_envs > 0:
        envs = LiberoVectorEnv(
            args.suite,
            args.num_envs,
            camera_size=args.camera_size,
            max_steps=OFT_EVAL_MAX_STEPS[args.suite] if args.oft_eval_max_steps else args.max_episode_steps,
            use_workers=args.env_workers,
            gpu_id=dist.local_rank if device.type == "cuda" else -1,
            seed=args.seed + dist.rank * args.num_envs,
            center_crop=args.center_crop,
            max_restarts=args.env_max_restarts,
        )
    logger = Logger(run_path, args, enabled=dist.is_main)
    print0(
        f"run {run_path}: {args.num_samples} chunk samples from {len(args.dataset)} dataset(s), {dist.world_size} "
        f"rank(s) x {args.batch_size} = {args.global_batch_size} samples per step, {args.total_iterations} steps "
        f"({args.total_iterations * args.global_batch_size / args.num_samples:.1f} epochs); "
        f"{sum(p.numel() for p in trainable):,} trainable parameters; statistics key {args.unnorm_key!r}"
    )

    def run_evaluation(step: int) -> tuple[dict, list, list]:
        if envs is None:  # --num-envs 0: no simulator evaluation
            return {}, [], []
        with torch.no_grad():
            metrics, frames, episodes = evaluate(
                policy, processor, env_action, envs, args, dist, autocast, logger, step
            )
        policy.train()
        return metrics, frames, episodes

    def write(directory: str, full_state: Optional[dict]) -> None:
        """LoRA adapter, or the full model in the openvla-7b layout."""
        if lora_config is not None:
            save_lora_adapter(vla, lora_config, directory)
        else:
            vla_state = fsdp.sub_state_dict(full_state, "vla.") if full_state else None
            save_openvla(vla, processor, os.path.join(directory, "model"), state_dict=vla_state)

    shell = RunShell(args, run_path, policy, optimizer, sharded, write, logger, envs, EVAL_PROTOCOL_FLAGS)
    if args.eval_only:
        return shell.eval_only(run_evaluation, start_iteration)

    summary = (  # the line printed after every iteration
        "loss {actor/loss:.4f} bin acc {actor/bin_accuracy:.3f} chunk acc {actor/chunk_accuracy:.3f} "
        "samples/s {time/update_samples_per_s:.1f}"
    )
    policy.train()
    for iteration in range(start_iteration + 1, args.total_iterations + 1):
        # -----------------------------------------------------------------------------------------------------------
        # 1. Batch: this rank's slice of the global batch, from the seeded per-epoch permutation
        # -----------------------------------------------------------------------------------------------------------
        update_start = time.time()
        indices = batch_indices(iteration, args, dist.rank)  # (batch_size,)

        # -----------------------------------------------------------------------------------------------------------
        # 2. Update: mean cross-entropy over the 56 slots; micro-batches accumulate, DDP / FSDP average ranks
        # -----------------------------------------------------------------------------------------------------------
        sums = {"loss": 0.0, "bin_correct": 0.0, "chunk_correct": 0.0, "l1": 0.0}
        micro_batches = indices.split(args.micro_batch_size)
        for k, micro in enumerate(micro_batches):
            last = ddp_policy is policy or k == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else ddp_policy.no_sync()
            prompt_ids, prompt_mask = processor.prompt_ids([data["instructions"][i] for i in micro], device)
            with sync, autocast:
                pixel_values = processor.preprocess_images(data["rgb"][micro].to(device))
                loss, stats_mb = chunk_loss(
                    ddp_policy, prompt_ids, prompt_mask, pixel_values, data["bins"][micro].to(device)
                )
                (loss * len(micro) / len(indices)).backward()
            sums["loss"] += loss.item() * len(micro) / len(indices)
            for key, value in stats_mb.items():
                sums[key] += value
        clip = fsdp.clip_grad_norm_ if sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(trainable, args.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_time = time.time() - update_start

        # -----------------------------------------------------------------------------------------------------------
        # 3. Log, evaluate, checkpoint
        # -----------------------------------------------------------------------------------------------------------
        metrics = all_reduce_mean(
            {
                "actor/loss": sums["loss"],
                "actor/bin_accuracy": sums["bin_correct"] / (args.batch_size * NUM_ACTION_TOKENS),
                "actor/chunk_accuracy": sums["chunk_correct"] / args.batch_size,
                "actor/action_l1": sums["l1"] / (args.batch_size * NUM_ACTION_TOKENS),
            }
        )
        metrics |= {
            "actor/grad_norm": grad_norm,
            "actor/lr": optimizer.param_groups[0]["lr"],
            "actor/epoch": iteration * args.global_batch_size / args.num_samples,
            "time/update_s": update_time,
            "time/update_samples_per_s": args.global_batch_size / update_time,
        }
        if shell.end_of_iteration(iteration, metrics, run_evaluation, summary):
            return shell.close()  # stopped (SIGTERM / Ctrl-C): resume later; the final model comes at the end

    # ---------------------------------------------------------------------------------------------------------------
    # Final model for srpo_openvla_oft.py --model-path: LoRA merged, dataset_statistics.json, openvla-7b layout
    # ---------------------------------------------------------------------------------------------------------------
    full_state = fsdp.full_state_dict(policy) if sharded else None  # collective: every rank
    if dist.is_main:
        final_dir = os.path.join(run_path, "final")
        if lora_config is not None:
            merge_lora(vla)
        vla_state = fsdp.sub_state_dict(full_state, "vla.") if full_state else None
        save_openvla(vla, processor, final_dir, state_dict=vla_state)
        with open(os.path.join(final_dir, "dataset_statistics.json"), "w") as f:
            json.dump(dataset_statistics(norm_stats, args.unnorm_key), f, indent=2)
        print0(f"final model (for srpo_openvla_oft.py --model-path, --unnorm-key {args.unnorm_key}): {final_dir}")
    shell.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
