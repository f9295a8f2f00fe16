"""Supervised fine-tuning (behaviour cloning) of OpenVLA on scripted-expert demonstrations, as action-bin tokens.

Every demo step (camera image, instruction -> expert action) becomes one sample with OpenVLA's own prompt
("In: What action should the robot take to {instruction}?\\nOut:") and 7 target action tokens:

    1. gripper into OpenVLA's convention: the demos' env gripper g in {-1 close, +1 open} becomes (g + 1) / 2 in
       {0, 1} (1 = open, as in OpenVLA's Bridge data), left un-normalised (mask False);
    2. the 6 pose dims normalised with the demos' 1st/99th percentiles, clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1,
       -1, 1) (OpenVLA's BOUNDS_Q99 normalisation);
    3. binned with `ActionTokenizer.normalized_to_tokens` (256 bins on the last 256 vocabulary tokens).

The loss is the teacher-forced cross-entropy over the full vocabulary on the 7 action tokens, prompt masked out, as
OpenVLA's finetune.py does (without its end-of-sequence target: ppo_openvla.py decodes exactly 7 tokens).
The way back, which ppo_openvla.py applies to its decoded tokens and `evaluate` below mirrors: bin centre ->
`ActionTokenizer.unnormalize` with the stats -> env gripper 2 (g > 0.5) - 1. Demo action -> tokens -> action
returns every pose dim within one bin ((q99 - q01) / 255 after clipping to [q01, q99]) and the gripper exactly.

The statistics (the demos' `action_norm_stats`, gripper in the {0, 1} convention) are written to the final
checkpoint's config.json as `norm_stats[--unnorm-key]` (default `maniskill_{env_id}` lowercased), next to the base
model's keys; `ppo_openvla.py --unnorm-key KEY` un-normalises with them. The final model, LoRA merged into the base
weights, is saved in the openvla-7b layout (common/models/openvla.py `save_openvla`) at
{run_dir}/{exp_name}__s{seed}/final/.

Anchor: OpenVLA's LoRA fine-tuning (openvla/vla-scripts/finetune.py: lr 5e-4, LoRA rank 32, dropout 0, every linear
layer). Departures:
- Demonstrations come from scripted experts (collect_demos.py) in ManiSkill3, not RLDS datasets; images are not
  augmented.
- Batches walk a fresh permutation of all samples per epoch, seeded by (seed, epoch), each rank taking its slice of
  every global batch, so a resumed run sees exactly the batches an uninterrupted one would.
- Evaluation decodes with ppo_openvla.py's `ActorCritic.act` (greedy over the 256 action bins), imported from the
  script, on the same held-out initial states as its evaluation.

Run:
    python collect_demos.py --env-id PickCube-v1 --num-episodes 100 --image-size 224
    python sft_openvla.py --demos demos/PickCube-v1 --model-path openvla/openvla-7b --num-epochs 10
    torchrun --nproc-per-node 8 sft_openvla.py --demos demos/PickCube-v1 --model-path openvla/openvla-7b
    python ppo_openvla.py --model-path runs/sft_openvla__s1/final --unnorm-key maniskill_pickcube-v1 \
        --env-id PickCube-v1
    python sft_openvla.py --eval-only --checkpoint runs/sft_openvla__s1/checkpoints --demos demos/PickCube-v1
"""

import contextlib
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

from common.checkpoint import check_run_flags
from common.dist import all_reduce_mean, bf16_autocast, init_dist, print0
from common.envs.demos import action_norm_stats, load_demos, read_meta
from common.envs.maniskill import ManiSkillVLAEnv, check_env_id, check_render_device, held_out_seeds
from common.evaluation import advance, gather_episodes, progress, success_metrics
from common.logger import Logger, check_tracking, video_file
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
from ppo_openvla import ActorCritic, to_env_action  # the RL script's greedy decoding and action conversion

ACTION_DIM = 7


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "sft_openvla"
    """name of the run; logs, checkpoints and the final model go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds torch (LoRA init) and the batch order"""
    # --- model ---
    model_path: str = "openvla/openvla-7b"
    """OpenVLA checkpoint: a local directory in the openvla-7b layout or a hub id"""
    unnorm_key: Optional[str] = None
    """norm_stats key the demos' action statistics are saved under (default: maniskill_{env_id}, lowercased)"""
    lora_rank: int = 32
    """LoRA rank on every linear layer but the LM head; 0 = full fine-tuning"""
    lora_alpha: int = 16
    """LoRA scaling numerator (the adapter is scaled by alpha / rank)"""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (saves memory, costs ~30% time)"""
    bf16: bool = True
    """on GPU: bfloat16 weights for the frozen base under LoRA, and bf16 autocast (ignored on CPU)"""
    # --- data ---
    demos: tuple[str, ...] = ("demos/PickCube-v1",)
    """one or more demo folders written by collect_demos.py (all their steps are held in memory)"""
    # --- environment (evaluation) ---
    env_id: Optional[str] = None
    """ManiSkill3 task to evaluate on (default: the first demo folder's)"""
    instruction: Optional[str] = None
    """override the task's language instruction at evaluation"""
    num_envs: int = 16
    """evaluation envs per rank = evaluation episodes per rank (0: no simulator evaluation)"""
    max_episode_steps: int = 80
    """episode length limit at evaluation"""
    image_size: Optional[int] = None
    """camera resolution of the evaluation envs (default: the first demo folder's)"""
    sim_backend: Literal["auto", "cpu", "gpu"] = "auto"
    """ManiSkill physics: auto is gpu (physx_cuda, all envs in one process) when CUDA is visible, else cpu (one
    worker process per core, each with a slice of the envs). physx_cuda downloads its PhysX GPU library from GitHub on
    first use; on a node without internet, use cpu (the policy still runs on the GPU)"""
    # --- algorithm: SFT ---
    total_iterations: int = 1000
    """optimizer steps (ignored when --num-epochs is set)"""
    num_epochs: Optional[float] = None
    """train for this many passes over the demos: total_iterations = ceil(epochs x samples / global batch)"""
    batch_size: int = 16
    """samples per rank per optimizer step"""
    learning_rate: float = 5e-4
    """AdamW learning rate (constant)"""
    micro_batch_size: int = 8
    """samples per forward/backward; a batch accumulates gradients over micro-batches"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    # --- eval, logging, checkpoints ---
    eval_interval: int = 100
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
    save_interval: int = 100
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
    control_mode: tyro.conf.Suppress[str] = ""
    """the demos' ManiSkill controller, used by the evaluation envs"""
    global_batch_size: tyro.conf.Suppress[int] = 0
    """samples per optimizer step over all ranks (batch_size x world size)"""
    num_samples: tyro.conf.Suppress[int] = 0
    """demo steps in all --demos folders"""


def validate(args: Args, world_size: int) -> str:
    """Every check that can fail on user input, before envs or weights are loaded. Returns the run directory."""
    check_tracking(args)  # --track without wandb installed
    if min(args.batch_size, args.micro_batch_size, args.max_episode_steps) < 1 or args.num_envs < 0:
        raise ValueError("--batch-size, --micro-batch-size, --max-episode-steps must be >= 1 and --num-envs >= 0")
    if args.batch_size % args.micro_batch_size:
        raise ValueError(
            f"--batch-size ({args.batch_size}) must be a multiple of --micro-batch-size ({args.micro_batch_size})"
        )
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {args.lora_rank}")
    if args.eval_only and args.num_envs == 0:
        raise ValueError("--eval-only evaluates in the simulator: --num-envs must be >= 1")
    metas = []
    for path in args.demos:
        if not os.path.isfile(os.path.join(path, "meta.json")):
            raise FileNotFoundError(f"--demos {path!r} has no meta.json: write demos with collect_demos.py")
        metas.append(read_meta(path))
    if len({m["control_mode"] for m in metas}) > 1:
        raise ValueError(f"--demos mix control modes {sorted({m['control_mode'] for m in metas})}: one action space")
    args.control_mode = metas[0]["control_mode"]
    args.num_samples = sum(m["action_norm_stats"]["num_transitions"] for m in metas)
    args.global_batch_size = args.batch_size * world_size
    if args.num_epochs is not None:
        args.total_iterations = math.ceil(args.num_epochs * args.num_samples / args.global_batch_size)
    if args.total_iterations < 1:
        raise ValueError("--total-iterations (or --num-epochs) must give at least one optimizer step")
    args.env_id = args.env_id or metas[0]["env_id"]
    args.image_size = args.image_size or metas[0]["image_size"]
    args.unnorm_key = args.unnorm_key or f"maniskill_{metas[0]['env_id']}".lower()
    run_path = check_run_flags(
        args, "sft_openvla.py", inherited=("model_path", "unnorm_key", "lora_rank", "lora_alpha")
    )
    if args.num_envs > 0:
        check_env_id(args.env_id)
        check_render_device()
    args.model_path = resolve_model_path(args.model_path)
    read_openvla_config(args.model_path)
    return run_path


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: demo actions <-> action tokens, teacher-forced cross-entropy on the 7 action tokens
# ---------------------------------------------------------------------------------------------------------------
def env_to_model_actions(actions: torch.Tensor) -> torch.Tensor:
    """Env actions (N, 7), gripper -1 close / +1 open -> OpenVLA's convention, gripper 0 close / 1 open."""
    return torch.cat([actions[:, :6], (actions[:, 6:] + 1) / 2], dim=1)


def action_loss(vla, pixel_values, prompt_ids, prompt_mask, target_tokens, action_tokenizer: ActionTokenizer):
    """Teacher-forced cross-entropy (mean over the 7 tokens and the batch) over the full vocabulary; the last 7
    positions of prompt + target[:-1] predict the 7 targets. Returns loss and stats summed over the batch:
    token_correct (full-vocabulary argmax), free_correct (argmax over the 256 action bins, what greedy decoding picks),
    action_correct (all 7 right), l1 (summed |greedy bin centre - target bin centre| in normalised units)."""
    ids = torch.cat([prompt_ids, target_tokens[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(ids), ACTION_DIM - 1)], dim=1)
    logits = vla(ids, mask, pixel_values, logits_to_keep=ACTION_DIM).logits.float()  # (B, 7, V)
    loss = F.cross_entropy(logits.flatten(0, 1), target_tokens.flatten())
    with torch.no_grad():
        first = action_tokenizer.first_token
        greedy = logits[..., first : first + action_tokenizer.n_bins].argmax(-1) + first  # (B, 7)
        free_hit = greedy == target_tokens
        l1 = action_tokenizer.tokens_to_normalized(greedy) - action_tokenizer.tokens_to_normalized(target_tokens)
        stats = {
            "token_correct": (logits.argmax(-1) == target_tokens).sum().item(),
            "free_correct": free_hit.sum().item(),
            "action_correct": free_hit.all(1).sum().item(),
            "l1": l1.abs().sum().item(),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# Data: every demo step in memory; batches walk one seeded permutation per epoch (common/run.py)
# ---------------------------------------------------------------------------------------------------------------
def load_samples(paths: tuple[str, ...], action_tokenizer: ActionTokenizer) -> tuple[dict, dict]:
    """All steps of all episodes -> (samples, norm_stats entry). samples: rgb (N, H, W, 3) uint8, tokens (N, 7)
    targets, instructions (N,). The entry is `action_norm_stats` of the model-convention actions."""
    episodes = [e for path in paths for e in load_demos(path)]
    actions = env_to_model_actions(torch.from_numpy(np.concatenate([e["action"] for e in episodes])).float())  # (N, 7)
    norm_stats = action_norm_stats([{"action": a.numpy()} for a in actions.split([len(e["action"]) for e in episodes])])
    stats = norm_stats["action"]
    samples = dict(
        rgb=torch.from_numpy(np.concatenate([e["rgb"] for e in episodes])),  # (N, H, W, 3)
        tokens=action_tokenizer.normalized_to_tokens(ActionTokenizer.normalize(actions, stats)),  # (N, 7)
        instructions=[e["instruction"] for e in episodes for _ in range(len(e["action"]))],
    )
    return samples, norm_stats


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: ppo_openvla.py's greedy decoding on its held-out initial states
# ---------------------------------------------------------------------------------------------------------------
EVAL_PROTOCOL_FLAGS = ("env_id", "instruction", "control_mode", "max_episode_steps", "eval_temperature")


@torch.no_grad()
def evaluate(policy, processor, env_action, envs, args, dist, autocast, step: int):
    """One episode per env from the held-out seeds (common/envs/maniskill.py `held_out_seeds`, as ppo_openvla.py),
    decoded at --eval-temperature; an episode ends at success. Returns the metrics, env 0's frames and every rank's
    episodes."""
    policy.eval()
    seeds = held_out_seeds(dist.rank, envs.num_envs)
    obs = envs.reset(seeds)
    prompt_ids, prompt_mask = processor.prompt_ids(envs.instructions, device=dist.device)
    finished = torch.zeros(envs.num_envs, dtype=torch.bool)
    success = torch.zeros(envs.num_envs, dtype=torch.bool)
    length = torch.zeros(envs.num_envs)
    frames = [obs["rgb"][0]] if args.capture_video else []
    bar = progress(envs.max_episode_steps, f"eval {args.env_id}", "step", dist.is_main)
    for _ in range(envs.max_episode_steps):
        with autocast:
            pixel_values = processor.preprocess_images(obs["rgb"].to(dist.device))
            tokens, _, _ = policy.act(pixel_values, prompt_ids, prompt_mask, args.eval_temperature)
        obs, _, terminated, truncated, info = envs.step(env_action(tokens))
        length += (~finished).float()
        success |= info["success"] & ~finished
        if args.capture_video and not finished[0]:
            frames.append(info["final_obs"]["rgb"][0])
        finished |= terminated | truncated
        advance(bar, 1, f"{int(finished.sum())} of {envs.num_envs} episodes ended, {int(success.sum())} succeeded")
        if finished.all():
            break
    bar.close()
    policy.train()
    mine = [
        {"task": args.env_id, "seed": seed, "success": bool(success[i]), "length": int(length[i])}
        | {"temperature": args.eval_temperature}
        for i, seed in enumerate(seeds)
    ]
    if args.capture_video and dist.is_main:
        mine[0]["video"] = video_file("eval/video", step)
    episodes = gather_episodes(mine)
    return success_metrics(episodes), frames, episodes


def main(args: Args) -> None:
    # ---------------------------------------------------------------------------------------------------------------
    # Setup: validation, distributed, seeds, model, optimizer, data, envs
    # ---------------------------------------------------------------------------------------------------------------
    dist = init_dist(args.dist_timeout_s)
    run_path = validate(args, dist.world_size)
    device = dist.device
    checkpoint_dir = args.resume or args.checkpoint
    torch.manual_seed(args.seed)  # identical LoRA init on every rank (DDP also broadcasts rank 0's)
    dtype = torch.bfloat16 if (device.type == "cuda" and args.bf16 and args.lora_rank > 0) else torch.float32
    autocast = bf16_autocast(device, args.bf16)
    model_dir = os.path.join(checkpoint_dir, "model") if checkpoint_dir and args.lora_rank == 0 else args.model_path
    vla, processor = load_openvla(model_dir, device=device, dtype=dtype)
    if args.gradient_checkpointing:
        vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = make_trainable(vla, args.lora_rank, args.lora_alpha)  # None = full fine-tuning
    if checkpoint_dir and lora_config is not None:
        load_lora_adapter(vla, checkpoint_dir)
    action_tokenizer = ActionTokenizer(vla.vocab_size, vla.n_action_bins)
    policy = ActorCritic(vla, action_tokenizer).to(device)  # for evaluation; its value head is unused
    trainable = [p for p in vla.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    start_iteration = resume_training(args, vla, optimizer, sharded=False)
    ddp_vla = DDP(vla) if dist.world_size > 1 else vla  # DDP broadcasts rank 0's weights at construction

    data, norm_stats = load_samples(args.demos, action_tokenizer)
    stats = norm_stats["action"]

    def env_action(tokens: torch.Tensor) -> torch.Tensor:
        return to_env_action(tokens, action_tokenizer, stats)  # (N, 7)

    envs = None
    if args.num_envs > 0:
        envs = ManiSkillVLAEnv(
            args.env_id,
            args.num_envs,
            sim_backend=args.sim_backend,
            image_size=args.image_size,
            instruction=args.instruction,
            max_episode_steps=args.max_episode_steps,
            control_mode=args.control_mode,
        )
    logger = Logger(run_path, args, enabled=dist.is_main)
    print0(
        f"run {run_path}: {args.num_samples} demo steps from {len(args.demos)} folder(s), {dist.world_size} "
        f"rank(s) x {args.batch_size} = {args.global_batch_size} samples per step, {args.total_iterations} steps "
        f"({args.total_iterations * args.global_batch_size / args.num_samples:.1f} epochs); "
        f"{sum(p.numel() for p in trainable):,} trainable parameters; norm_stats key {args.unnorm_key!r}"
    )

    def run_evaluation(step: int) -> tuple[dict, list, list]:
        if envs is None:  # --num-envs 0: no simulator evaluation
            return {}, [], []
        return evaluate(policy, processor, env_action, envs, args, dist, autocast, step)

    def write(directory: str, full_state: Optional[dict]) -> None:
        """LoRA adapter (or the full model in the openvla layout)."""
        if lora_config is not None:
            save_lora_adapter(vla, lora_config, directory)
        else:
            save_openvla(vla, processor, os.path.join(directory, "model"))

    shell = RunShell(args, run_path, vla, optimizer, False, write, logger, envs, EVAL_PROTOCOL_FLAGS)
    if args.eval_only:
        return shell.eval_only(run_evaluation, start_iteration)

    summary = (  # the line printed after every iteration
        "loss {actor/loss:.4f} free-slot acc {actor/free_slot_accuracy:.3f} action l1 {actor/action_l1:.4f} "
        "samples/s {time/update_samples_per_s:.1f}"
    )
    vla.train()
    for iteration in range(start_iteration + 1, args.total_iterations + 1):
        # -----------------------------------------------------------------------------------------------------------
        # 1. Batch: this rank's slice of the global batch, from the seeded per-epoch permutation
        # -----------------------------------------------------------------------------------------------------------
        update_start = time.time()
        indices = batch_indices(iteration, args, dist.rank)  # (batch_size,)

        # -----------------------------------------------------------------------------------------------------------
        # 2. Update: mean cross-entropy over the 7 action tokens; micro-batches accumulate, DDP averages ranks
        # -----------------------------------------------------------------------------------------------------------
        sums = {"loss": 0.0, "token_correct": 0.0, "free_correct": 0.0, "action_correct": 0.0, "l1": 0.0}
        micro_batches = indices.split(args.micro_batch_size)
        for k, micro in enumerate(micro_batches):
            last = dist.world_size == 1 or k == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else ddp_vla.no_sync()
            prompt_ids, prompt_mask = processor.prompt_ids([data["instructions"][i] for i in micro], device=device)
            with sync, autocast:
                pixel_values = processor.preprocess_images(data["rgb"][micro].to(device))
                loss, stats_mb = action_loss(
                    ddp_vla, pixel_values, prompt_ids, prompt_mask, data["tokens"][micro].to(device), action_tokenizer
                )
                (loss * len(micro) / len(indices)).backward()
            sums["loss"] += loss.item() * len(micro) / len(indices)
            for key, value in stats_mb.items():
                sums[key] += value
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_time = time.time() - update_start

        # -----------------------------------------------------------------------------------------------------------
        # 3. Log, evaluate, checkpoint
        # -----------------------------------------------------------------------------------------------------------
        metrics = all_reduce_mean(
            {
                "actor/loss": sums["loss"],
                "actor/token_accuracy": sums["token_correct"] / (args.batch_size * ACTION_DIM),
                "actor/free_slot_accuracy": sums["free_correct"] / (args.batch_size * ACTION_DIM),
                "actor/action_accuracy": sums["action_correct"] / args.batch_size,
                "actor/action_l1": sums["l1"] / (args.batch_size * ACTION_DIM),
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
    # Final model for ppo_openvla.py --model-path: LoRA merged, norm_stats[unnorm_key] added, openvla-7b layout
    # ---------------------------------------------------------------------------------------------------------------
    if dist.is_main:
        final_dir = os.path.join(run_path, "final")
        if lora_config is not None:
            merge_lora(vla)
        vla.config["norm_stats"] = {**(vla.config.get("norm_stats") or {}), args.unnorm_key: norm_stats}
        save_openvla(vla, processor, final_dir)
        print0(f"final model (for ppo_openvla.py --model-path ... --unnorm-key {args.unnorm_key}): {final_dir}")
    shell.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
