"""Training guards that every rank applies identically: non-finite losses/gradients, non-finite state before a
save, and a stop request (SIGTERM/SIGINT from Slurm, Kubernetes or Ctrl-C) that ends the run with a checkpoint."""

import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Optional

import torch
from torch.distributed.tensor import DTensor

from common.dist import all_reduce_max_, any_rank


def check_flags(args, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Sizes must be >= 1 and intervals/counts >= 0: fail before any work, naming the flag (a None value is a
    default and passes)."""
    for names, low in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(args, name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def check_finite_logits(logits: torch.Tensor) -> None:
    """Sampling from NaN/inf logits fails with an obscure error; say what happened instead."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError(
            "the policy produced non-finite action logits: the weights diverged. Lower "
            "--learning-rate (or --max-grad-norm) and resume from the last checkpoint (saved "
            "checkpoints hold finite values only)"
        )


class NonFiniteGuard:
    """Skip an optimizer step whose loss or gradient norm is not finite, on every rank alike; raise after
    `max_in_a_row` skipped steps in a row.

        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # the norm before clipping
        guard.step(optimizer, loss, grad_norm)  # optimizer.step(), or zero the gradients and skip
    """

    def __init__(self, max_in_a_row: int = 3):
        self.max_in_a_row = max_in_a_row
        self.skipped_steps = 0  # over the whole run: log it as actor/skipped_steps
        self.in_a_row = 0

    def finite(self, loss, grad_norm) -> bool:
        """Whether the loss and gradient norm are finite on every rank (one all-reduce); counts a skip if not."""
        values = [
            torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1) for v in (loss, grad_norm) if v is not None
        ]
        bad = any(not torch.isfinite(v).all().item() for v in values)
        if not any_rank(bad):
            self.in_a_row = 0
            return True
        self.skipped_steps += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"loss/gradients non-finite for {self.in_a_row} optimizer steps in a row (this rank: loss "
                f"{_describe(loss)}, grad norm {_describe(grad_norm)}): lower --learning-rate or --max-grad-norm, "
                f"check the rewards and inputs for NaN/inf, and resume from the last checkpoint (saved checkpoints "
                f"hold finite values only)"
            )
        return False

    def step(self, optimizer: torch.optim.Optimizer, loss, grad_norm) -> bool:
        """optimizer.step() when `finite`; otherwise zero the gradients so the bad step leaves no trace."""
        if self.finite(loss, grad_norm):
            optimizer.step()
            return True
        optimizer.zero_grad(set_to_none=True)
        return False


def _describe(value) -> str:
    if value is None:
        return "n/a"
    value = torch.as_tensor(value, dtype=torch.float32).detach().reshape(-1)
    return f"{value[0].item():.4g}" if value.numel() == 1 else f"{(~torch.isfinite(value)).sum().item()} non-finite"


def named_state_tensors(module: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]):
    """(name, tensor) of the trainable parameters and of the optimizer state, in the same order on every rank (this
    rank's shard of an FSDP-sharded tensor)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    names = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            names[id(param)] = name
            yield name, local(param)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    yield f"optimizer state {key} of {names.get(id(param), 'a parameter')}", local(value)


def check_finite_state(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise on every rank if any tensor is not finite, naming the first bad one (the lowest index over ranks; every
    rank must pass the same names in the same order). Call it on every rank before writing a checkpoint."""
    names, flags = [], []
    for name, tensor in named_tensors:
        names.append(name)
        flags.append(bool(torch.isfinite(tensor.detach()).all().item()))
    bad = [i for i, ok in enumerate(flags) if not ok]
    first_bad = torch.tensor([-(bad[0] if bad else len(names))], dtype=torch.float64)  # max of -index = min index
    index = int(-all_reduce_max_(first_bad).item())
    if index < len(names):
        raise FloatingPointError(
            f"not saving a checkpoint: {names[index]} holds NaN/inf. The training diverged; resume from the last "
            f"checkpoint with a lower --learning-rate or --max-grad-norm"
        )


class StopRequest:
    """Turn SIGTERM/SIGINT into a request to stop after the current iteration, agreed by every rank.

    Slurm and Kubernetes send SIGTERM before killing a job, and torchrun forwards SIGTERM/SIGINT to its workers.
    The first signal sets a flag; `should_stop()` (one all-reduce, called once per iteration on every rank) returns
    True on every rank once any rank got a signal: the script saves a checkpoint and exits 0. A second SIGINT
    (Ctrl-C again, more than `repeat_window_s` after the first: torchrun forwards the terminal's Ctrl-C a few
    milliseconds later) stops at once with KeyboardInterrupt; repeated SIGTERMs are ignored.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), repeat_window_s: float = 2.0):
        self.requested = False
        self.signal_name: Optional[str] = None
        self.repeat_window_s = repeat_window_s
        self._first_at = 0.0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested, self.signal_name, self._first_at = True, name, time.monotonic()
            print(
                f"received {name}: finishing the current iteration, then saving a checkpoint and exiting "
                f"(Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > self.repeat_window_s:
            raise KeyboardInterrupt

    def should_stop(self) -> bool:
        """True on every rank when any rank received a stop signal. Call it at the same point on every rank."""
        return any_rank(self.requested)

    def restore(self) -> None:
        """Put back the signal handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_with_parent(trainer_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), so env workers never
    outlive a trainer killed with SIGKILL, which no handler of the trainer sees; and exit now if the trainer
    (`trainer_pid`) is no longer the parent or the parent's parent, since the signal comes only from the death of a
    parent this process had when it asked for it. Call it first thing in a worker (and in a forkserver between the
    trainer and its workers: see common/envs/forkserver_exit.py)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    parent = os.getppid()
    if trainer_pid not in (parent, _parent_of(parent)):  # a dead trainer's children have been handed to init already
        os._exit(0)


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
