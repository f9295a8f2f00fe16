"""The shell every training script repeats around its own algorithm: resume, save, evaluate-only, the loop's tail.

    start_iteration = resume_training(args, policy, optimizer, sharded)  # --resume (or the step of --checkpoint)
    shell = RunShell(args, run_path, policy, optimizer, sharded, write, logger, envs)
    if args.eval_only:
        return shell.eval_only(run_evaluation, start_iteration)
    for iteration in range(start_iteration + 1, args.total_iterations + 1):
        ...                                                          # the script's own stages 1-4
        if shell.end_of_iteration(iteration, metrics, run_evaluation, summary):
            break                                                    # SIGTERM / Ctrl-C: saved, exit 0
    shell.close()

`write(directory, full_state)` writes the script's own weights (a LoRA adapter or the full model, plus whatever
else the script keeps); the shell adds the trainer state and publishes the directory atomically
(common/checkpoint.py). `run_evaluation(step)` returns (metrics, frames, episodes): frames, a list of (H, W, 3) uint8
images of env 0, is logged as eval/video when not empty (a script may log its own videos at `step` and return none);
episodes, every rank's episode records (common/evaluation.py), go to {run}/eval/step_XXXXXXXX.jsonl with a summary.
`eval_flags` names the flags that define the evaluation protocol, recorded in that summary.
"""

import json
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from common import fsdp
from common.checkpoint import (
    load_trainer_state,
    restore_rng,
    save_checkpoint,
    save_trainer_state,
    trainer_state,
    unlock_run_dir,
)
from common.dist import check_in_sync, cleanup, is_main_process, print0
from common.evaluation import summarize, write_evaluation
from common.guards import StopRequest, check_finite_state, named_state_tensors
from common.logger import is_due


def resume_training(args, policy, optimizer: torch.optim.Optimizer, sharded: bool) -> int:
    """--resume: the optimizer state (the gathered full state, resharded, under FSDP) and the RNG state of the
    checkpoint's trainer state; returns its step, the iteration to continue after. With --checkpoint (evaluation)
    only the step is read. 0 for a new run."""
    checkpoint_dir = args.resume or getattr(args, "checkpoint", None)
    if not checkpoint_dir:
        return 0
    state = load_trainer_state(checkpoint_dir, mmap=sharded)
    if args.resume:
        if sharded:
            fsdp.load_full_optimizer_state_dict(policy, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        restore_rng(state)
        print0(f"resumed from {args.resume} at iteration {state['step']}")
    return state["step"]


class RunShell:
    def __init__(
        self,
        args,
        run_path: str,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        sharded: bool,
        write: Callable[[str, Optional[dict]], None],
        logger,
        envs=None,
        eval_flags: tuple[str, ...] = (),
    ):
        self.args, self.run_path, self.policy, self.optimizer = args, run_path, policy, optimizer
        self.sharded, self.write, self.logger, self.envs = sharded, write, logger, envs
        self.eval_flags = eval_flags
        self.stop = StopRequest()  # SIGTERM / Ctrl-C: finish the iteration, save, exit 0

    def save(self, step: int) -> None:
        """The script's weights + trainer state, written atomically by rank 0. Never writes a non-finite value."""
        check_finite_state(named_state_tensors(self.policy, self.optimizer))
        full_state = optimizer_state = None
        if self.sharded:  # collective: the full weights and optimizer state gathered to rank 0
            full_state = fsdp.full_state_dict(self.policy)
            optimizer_state = fsdp.full_optimizer_state_dict(self.policy, self.optimizer)
        else:  # DDP or the hand-summed gradients keep ranks identical: verify before writing rank 0's copy
            check_in_sync([p for p in self.policy.parameters() if p.requires_grad])

        def write(directory: str) -> None:
            self.write(directory, full_state)
            save_trainer_state(directory, trainer_state(self.args, step, optimizer_state or self.optimizer))

        if is_main_process():
            ckpt_root = os.path.join(self.run_path, "checkpoints")
            path = save_checkpoint(ckpt_root, step, write, keep_last=self.args.keep_checkpoints)
            print0(f"saved {path}")

    def log_evaluation(self, run_evaluation: Callable[[int], tuple[dict, list, list]], step: int) -> dict:
        metrics, frames, episodes = run_evaluation(step)
        if frames:
            self.logger.video("eval/video", torch.stack([torch.as_tensor(f) for f in frames]).numpy(), step)
        if episodes and is_main_process():
            summary = summarize(episodes, self.args, self.eval_flags, step)
            records_path = write_evaluation(self.run_path, step, episodes, summary)
            low, high = summary["ci95"]
            print0(
                f"eval at step {step}: success {summary['success_rate']:.3f} (95% CI {low:.3f}-{high:.3f}) over "
                f"{summary['episodes']} episodes, protocol {summary['protocol']}; records {records_path}"
            )
        return metrics

    def eval_only(self, run_evaluation: Callable[[int], tuple[dict, list, list]], step: int) -> None:
        """--eval-only: evaluate once, print the metrics as JSON, close everything."""
        print0(json.dumps(self.log_evaluation(run_evaluation, step)))
        self.close()

    def end_of_iteration(
        self, iteration: int, metrics: dict, run_evaluation: Callable[[int], tuple[dict, list, list]], summary: str
    ) -> bool:
        """Evaluate (every --eval-interval iterations and after the last), log, print `summary` (a format string over
        the metric names) and checkpoint (every --save-interval iterations, after the last, and on a stop request).
        Returns True when a stop was requested: the caller leaves its loop."""
        args = self.args
        stop_now = self.stop.should_stop()
        if is_due(iteration, args.eval_interval, args.total_iterations) and not stop_now:
            metrics = metrics | self.log_evaluation(run_evaluation, iteration)
        self.logger.log(metrics, iteration)
        line = f"iter {iteration}: " + summary.format_map(metrics)
        if "eval/success_rate" in metrics:
            line += f" eval {metrics['eval/success_rate']:.3f}"
        print0(line)
        if is_due(iteration, args.save_interval, args.total_iterations) or stop_now:
            self.save(iteration)
        if stop_now:
            print0(
                f"stopped by {self.stop.signal_name} after iteration {iteration}; continue with --resume "
                f"{self.run_path}/checkpoints"
            )
        return stop_now

    def close(self) -> None:
        self.logger.close()
        if self.envs is not None:
            self.envs.close()
        unlock_run_dir(self.run_path)
        cleanup()


# ---------------------------------------------------------------------------------------------------------------
# The SFT scripts' batch order: one seeded permutation per epoch, so a resumed run sees the batches an uninterrupted
# one would
# ---------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def batch_indices(iteration: int, args, rank: int) -> torch.Tensor:
    """This rank's sample indices (args.batch_size,) for `iteration` (from 1): global positions (iteration - 1) x
    args.global_batch_size onwards in the concatenation of per-epoch permutations of args.num_samples (seeded by
    args.seed); rank r takes the r-th slice."""
    start = (iteration - 1) * args.global_batch_size + rank * args.batch_size
    positions = [divmod(p, args.num_samples) for p in range(start, start + args.batch_size)]
    return torch.tensor([epoch_order(args.seed, epoch, args.num_samples)[i] for epoch, i in positions])
