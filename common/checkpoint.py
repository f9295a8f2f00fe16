"""Atomic, resumable checkpoints: a directory per step, written under a temporary name and renamed when complete.

    ckpt_root/
      step_00000010/   trainer_state.pt (args, step, optimizer, RNG, git commit) + whatever the script writes
      step_00000020/
      latest           text file naming the newest complete step directory
"""

import dataclasses
import json
import os
import random
import shutil
import subprocess
from typing import Any, Callable, Optional

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: str, step: int, write_fn: Callable[[str], None], keep_last: Optional[int] = None) -> str:
    """Call `write_fn(tmp_dir)` to write every file, then atomically publish it as `ckpt_root/step_XXXXXXXX`.

    A crash at any point leaves either the previous checkpoint or the new one, never a half-written one."""
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(ckpt_root, name), os.path.join(ckpt_root, f".tmp_{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_fn(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(os.path.join(ckpt_root, "latest"), name + "\n")
    if keep_last:
        steps = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
        for old in steps[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return final


def resolve_checkpoint(path: str, flag: str = "--resume") -> str:
    """A step directory, or a checkpoint root whose `latest` file names one."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            step_dir = os.path.join(path, f.read().strip())
        if os.path.isfile(os.path.join(step_dir, STATE_FILE)):
            return step_dir
    raise FileNotFoundError(
        f"{flag} {path!r}: not a checkpoint. Pass a step directory containing {STATE_FILE} "
        f"(e.g. runs/NAME/checkpoints/step_00000010) or a checkpoints directory containing a `latest` file."
    )


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def trainer_state(args, step: int, optimizer: Optional[torch.optim.Optimizer | dict], **extra) -> dict[str, Any]:
    """Everything besides the weights that a resume needs, plus the settings and code version that produced it.
    optimizer: an optimizer, or its state dict already gathered (common.fsdp.full_optimizer_state_dict)."""
    return {
        "args": dataclasses.asdict(args),
        "step": step,
        "optimizer": optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer,
        "rng": rng_state(),
        "git_commit": git_commit(),
        **extra,
    }


def save_trainer_state(directory: str, state: dict[str, Any]) -> None:
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, "args.json"), "w") as f:
        json.dump({"args": state["args"], "step": state["step"], "git_commit": state["git_commit"]}, f, indent=2, default=str)


def load_trainer_state(directory: str, mmap: bool = False) -> dict[str, Any]:
    """mmap: tensors are read on first use and ranks loading the same file share the page cache (for a gathered
    full fine-tuning optimizer state, 8 bytes per parameter)."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False, mmap=mmap)
