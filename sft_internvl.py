"""Supervised fine-tuning (behaviour cloning) of InternVL on scripted-expert demonstrations, written as text actions.

Every demo step (camera image, end-effector pose, instruction -> expert action) becomes one sample: the prompt is
the one grpo_internvl.py builds (common/models/action_text.py `build_inputs`), the target is the answer grpo_internvl.py
decodes,

    action: {x: -18mm, y: -35mm, z: -28mm, roll: 0 degrees, pitch: 0 degrees, yaw: 4 degrees, open: 1}

i.e. `template.answer_ids(template.choices_from_action(action))`: the expert action rounded to whole millimetres and
degrees. The loss is the cross-entropy over the full vocabulary on every answer token, prompt tokens masked out
(standard chat SFT). The forced template tokens ("action: {x:", "mm, y:", ...) are part of the answer and are in the
loss; they are easy and constrained decoding never samples them, so the log also reports the free-slot accuracy:
how often the greedy choice among each sign / number / gripper slot's allowed tokens (what the RL script's
constrained decoding picks at temperature 0) equals the target. The answer ends at "}": no end-of-turn token, since
grpo_internvl.py stops decoding there.

The output the RL script starts from is `{run_dir}/{exp_name}__s{seed}/final/`: LoRA merged into the base weights
(peft's merge_and_unload) and saved with transformers' save_pretrained plus the processor, a plain InternVL `-hf`
checkpoint for `grpo_internvl.py --model-path`.

Anchor: the SFT stage before GRPO of the verl-fork text-action recipe (SimpleVLA-RL / siiRL start RL from a
demonstration-fine-tuned model). Departures:
- Demonstrations come from scripted experts (collect_demos.py), not teleoperation or motion planning.
- Batches are drawn by walking a fresh permutation of all samples per epoch, seeded by (seed, epoch), each rank taking
  its slice of every global batch, so a resumed run sees exactly the batches an uninterrupted one would.
- As in grpo_internvl.py, gradients are summed over ranks by hand (the loss is already divided by the global token
  count) instead of DDP.
- Evaluation decodes with grpo_internvl.py's own `generate_actions` (greedy, prefix-constrained) and loads the model
  with its `load_policy`, imported from the script, on the same held-out initial states as its evaluation.

Run:
    python collect_demos.py --env-id PushCube-v1 --num-episodes 100 --image-size 224
    python sft_internvl.py --demos demos/PushCube-v1 --model-path OpenGVLab/InternVL3-1B-hf --num-epochs 10
    torchrun --nproc-per-node 8 sft_internvl.py --demos demos/PushCube-v1 --model-path OpenGVLab/InternVL3-1B-hf
    python grpo_internvl.py --model-path runs/sft_internvl__s1/final --env-id PushCube-v1
    python sft_internvl.py --eval-only --checkpoint runs/sft_internvl__s1/checkpoints --demos demos/PushCube-v1
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro

from common.checkpoint import (
    check_run_flags,
    git_commit,
    script_name,
)
from common.dist import (
    all_reduce_mean,
    bf16_autocast,
    broadcast_parameters,
    init_dist,
    print0,
    sum_gradients_,
)
from common.envs.demos import load_demos, read_meta
from common.envs.maniskill import ManiSkillVLAEnv, check_env_id, check_render_device, held_out_seeds
from common.evaluation import advance, gather_episodes, progress, success_metrics
from common.logger import Logger, check_tracking, video_file
from common.models.action_text import ActionTemplate, build_inputs, load_processor_and_template
from common.run import RunShell, batch_indices, resume_training
from grpo_internvl import generate_actions, load_policy  # the RL script's decoding and model loading


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "sft_internvl"
    """name of the run; logs, checkpoints and the final model go to {run_dir}/{exp_name}__s{seed}"""
    run_dir: str = "runs"
    """parent directory of all runs"""
    seed: int = 1
    """seeds torch (LoRA init, per iteration) and the batch order"""
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
    # --- data ---
    demos: tuple[str, ...] = ("demos/PushCube-v1",)
    """one or more demo folders written by collect_demos.py (all their steps are held in memory)"""
    # --- environment (evaluation) ---
    env_id: Optional[str] = None
    """ManiSkill3 task to evaluate on (default: the first demo folder's)"""
    instruction: Optional[str] = None
    """override the task's language instruction at evaluation"""
    num_envs: int = 16
    """evaluation envs per rank = evaluation episodes per rank (0: no simulator evaluation)"""
    max_episode_steps: int = 75
    """env steps (= policy queries) per evaluation episode"""
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
    batch_size: int = 32
    """samples per rank per optimizer step"""
    learning_rate: float = 1e-4
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
    global_batch_size: tyro.conf.Suppress[int] = 0
    """samples per optimizer step over all ranks (batch_size x world size)"""
    num_samples: tyro.conf.Suppress[int] = 0
    """demo steps in all --demos folders"""


def validate(args: Args, world_size: int):
    """Every check that can fail on user input, before envs or weights are loaded. Returns the processor, the action
    template and the run directory."""
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
        if metas[-1]["control_mode"] != "pd_ee_delta_pose":
            raise ValueError(
                f"--demos {path!r}: control mode {metas[-1]['control_mode']!r}, but the text actions are "
                "pd_ee_delta_pose steps"
            )
    args.num_samples = sum(m["action_norm_stats"]["num_transitions"] for m in metas)
    args.global_batch_size = args.batch_size * world_size
    if args.num_epochs is not None:
        args.total_iterations = math.ceil(args.num_epochs * args.num_samples / args.global_batch_size)
    if args.total_iterations < 1:
        raise ValueError("--total-iterations (or --num-epochs) must give at least one optimizer step")
    args.env_id = args.env_id or metas[0]["env_id"]
    args.image_size = args.image_size or metas[0]["image_size"]
    run_path = check_run_flags(args, "sft_internvl.py", inherited=("model_path", "lora_rank", "lora_alpha"))
    if args.num_envs > 0:
        check_env_id(args.env_id)
        check_render_device()
    return *load_processor_and_template(args.model_path), run_path


# ---------------------------------------------------------------------------------------------------------------
# Data: every demo step in memory; batches walk one seeded permutation per epoch (common/run.py)
# ---------------------------------------------------------------------------------------------------------------
def load_samples(paths: tuple[str, ...], template: ActionTemplate) -> dict:
    """All steps of all episodes: rgb (N, H, W, 3) uint8, tcp_pose (N, 7), choices (N, F) answer targets,
    instructions (N,)."""
    episodes = [e for path in paths for e in load_demos(path)]
    actions = torch.from_numpy(np.concatenate([e["action"] for e in episodes])).float()  # (N, 7)
    return dict(
        rgb=torch.from_numpy(np.concatenate([e["rgb"] for e in episodes])),  # (N, H, W, 3)
        tcp_pose=torch.from_numpy(np.concatenate([e["tcp_pose"] for e in episodes])).float(),  # (N, 7)
        choices=template.choices_from_action(actions),  # (N, F)
        instructions=[e["instruction"] for e in episodes for _ in range(len(e["action"]))],
    )


# ---------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: teacher-forced cross-entropy on the answer tokens; free-slot accuracy
# ---------------------------------------------------------------------------------------------------------------
def answer_loss(policy, inputs, choices: torch.Tensor, template: ActionTemplate, num_tokens: float):
    """choices (B, F) target indices -> (loss, stats). One forward over prompt + answer (the prompt is left-padded, so
    the last A positions predict the A answer tokens); cross-entropy over the vocabulary summed over the answer tokens
    and divided by num_tokens (the batch's answer tokens over all ranks). stats are summed over the micro-batch:
    token_correct (full-vocabulary argmax on all answer tokens), free_correct (allowed-set argmax on the free slots),
    action_correct (every free slot of a sample right)."""
    answer_ids = template.answer_ids(choices.cpu()).to(inputs["input_ids"].device)  # (B, A)
    batch, answer_len = answer_ids.shape
    ids = torch.cat([inputs["input_ids"], answer_ids[:, :-1]], dim=1)  # the last answer token is never an input
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(batch, answer_len - 1)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = policy(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        pixel_values=inputs["pixel_values"],
        use_cache=False,
        logits_to_keep=answer_len,
    )
    logits = out.logits.float()  # (B, A, V)
    loss = F.cross_entropy(logits.flatten(0, 1), answer_ids.flatten(), reduction="sum") / num_tokens
    with torch.no_grad():
        free_pos = template.free_pos.to(ids.device)
        slot_ids = template.set_ids.to(ids.device)[template.free_set.to(ids.device)]  # (F, S)
        slot_valid = template.set_valid.to(ids.device)[template.free_set.to(ids.device)]  # (F, S)
        slot_logits = logits[:, free_pos].gather(2, slot_ids.expand(batch, -1, -1))  # (B, F, S)
        greedy = slot_logits.masked_fill(~slot_valid, -math.inf).argmax(-1)  # (B, F)
        free_hit = greedy == choices.to(ids.device)
        stats = {
            "token_correct": (logits.argmax(-1) == answer_ids).sum().item(),
            "free_correct": free_hit.sum().item(),
            "action_correct": free_hit.all(1).sum().item(),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: grpo_internvl.py's greedy constrained decoding on its held-out initial states
# ---------------------------------------------------------------------------------------------------------------
EVAL_PROTOCOL_FLAGS = ("env_id", "instruction", "max_episode_steps", "eval_temperature")  # as grpo_internvl.py


@torch.no_grad()
def evaluate(policy, processor, template, envs, args, dist, autocast, step: int):
    """One episode per env from the held-out seeds (common/envs/maniskill.py `held_out_seeds`, as grpo_internvl.py),
    decoded at --eval-temperature; an episode ends at success. Returns the metrics, env 0's frames and every rank's
    episodes."""
    device, N = next(policy.parameters()).device, envs.num_envs
    policy.eval()
    seeds = held_out_seeds(dist.rank, N)
    obs = envs.reset(seeds)
    running = torch.ones(N, dtype=torch.bool)
    success = torch.zeros(N, dtype=torch.bool)
    length = torch.full((N,), envs.max_episode_steps)
    frames = [obs["rgb"][0]] if args.capture_video else []
    bar = progress(envs.max_episode_steps, f"eval {args.env_id}", "step", dist.is_main)
    for t in range(envs.max_episode_steps):
        idx = running.nonzero().squeeze(1)
        inputs = build_inputs(
            processor, [envs.instructions[i] for i in idx], obs["rgb"][idx], obs["tcp_pose"][idx], device
        )
        with autocast:
            sampled = generate_actions(policy, inputs, template, args.eval_temperature, 0, 1.0)
        actions = torch.zeros(N, 7)
        actions[idx] = template.to_env_action(sampled.choices.cpu())
        was_running = running[0].item()
        obs, _, terminated, truncated, info = envs.step(actions)
        done = (terminated | truncated) & running
        success |= done & info["success"]
        length[done] = t + 1
        running &= ~done
        if args.capture_video and was_running:
            frames.append(info["final_obs"]["rgb"][0])
        advance(bar, 1, f"{int((~running).sum())} of {N} episodes ended, {int(success.sum())} succeeded (this rank)")
        if not running.any():
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
    processor, template, run_path = validate(args, dist.world_size)
    device = dist.device
    checkpoint_dir = args.resume or args.checkpoint
    torch.manual_seed(args.seed)  # identical initial LoRA weights on every rank (and broadcast below)
    autocast = bf16_autocast(device, args.bf16)
    policy = load_policy(args, device, checkpoint_dir)
    broadcast_parameters(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    start_iteration = resume_training(args, policy, optimizer, sharded=False)

    data = load_samples(args.demos, template)
    envs = None
    if args.num_envs > 0:
        envs = ManiSkillVLAEnv(
            args.env_id,
            args.num_envs,
            sim_backend=args.sim_backend,
            image_size=args.image_size,
            instruction=args.instruction,
            max_episode_steps=args.max_episode_steps,
        )
    logger = Logger(run_path, args, enabled=dist.is_main)
    print0(
        f"run {run_path}: {args.num_samples} demo steps from {len(args.demos)} folder(s), {dist.world_size} "
        f"rank(s) x {args.batch_size} = {args.global_batch_size} samples per step, {args.total_iterations} steps "
        f"({args.total_iterations * args.global_batch_size / args.num_samples:.1f} epochs); "
        f"{sum(p.numel() for p in trainable):,} trainable parameters; answer of {template.answer_len} tokens, "
        f"{template.num_free} free"
    )

    def run_evaluation(step: int) -> tuple[dict, list, list]:
        if envs is None:  # --num-envs 0: no simulator evaluation
            return {}, [], []
        return evaluate(policy, processor, template, envs, args, dist, autocast, step)

    def write(directory: str, full_state: Optional[dict]) -> None:
        """LoRA adapter (or the full model) + processor."""
        policy.save_pretrained(directory)
        processor.save_pretrained(directory)

    shell = RunShell(args, run_path, policy, optimizer, False, write, logger, envs, EVAL_PROTOCOL_FLAGS)
    if args.eval_only:
        return shell.eval_only(run_evaluation, start_iteration)

    summary = (  # the line printed after every iteration
        "loss {actor/loss:.4f} free-slot acc {actor/free_slot_accuracy:.3f} action acc {actor/action_accuracy:.3f} "
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
        # 2. Update: token-mean cross-entropy over the answers of all ranks; micro-batches accumulate gradients
        # -----------------------------------------------------------------------------------------------------------
        num_tokens = float(args.global_batch_size * template.answer_len)
        sums = {"loss": 0.0, "token_correct": 0.0, "free_correct": 0.0, "action_correct": 0.0}
        for micro in indices.split(args.micro_batch_size):
            inputs = build_inputs(
                processor, [data["instructions"][i] for i in micro], data["rgb"][micro], data["tcp_pose"][micro], device
            )
            with autocast:
                loss, stats = answer_loss(policy, inputs, data["choices"][micro], template, num_tokens)
            loss.backward()
            sums["loss"] += loss.item()
            for key, value in stats.items():
                sums[key] += value
        sum_gradients_(trainable)  # each rank's loss is already divided by the global token count
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_time = time.time() - update_start

        # -----------------------------------------------------------------------------------------------------------
        # 3. Log, evaluate, checkpoint
        # -----------------------------------------------------------------------------------------------------------
        metrics = all_reduce_mean(
            {
                "actor/loss": sums["loss"] * dist.world_size,  # each rank's share is divided by the global token count
                "actor/token_accuracy": sums["token_correct"] / (args.batch_size * template.answer_len),
                "actor/free_slot_accuracy": sums["free_correct"] / (args.batch_size * template.num_free),
                "actor/action_accuracy": sums["action_correct"] / args.batch_size,
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
    # Final model for grpo_internvl.py --model-path: LoRA merged into the base, transformers-native save_pretrained
    # ---------------------------------------------------------------------------------------------------------------
    if dist.is_main:
        final_dir = os.path.join(run_path, "final")
        model = policy.merge_and_unload() if args.lora_rank > 0 else policy
        model.save_pretrained(final_dir)
        processor.save_pretrained(final_dir)
        with open(os.path.join(final_dir, "sft_args.json"), "w") as f:
            json.dump(
                {
                    "script": script_name(),
                    "step": args.total_iterations,
                    "git_commit": git_commit(),
                    "args": asdict(args),
                },
                f,
                indent=2,
            )
        print0(f"final model (for grpo_internvl.py --model-path): {final_dir}")
    shell.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
