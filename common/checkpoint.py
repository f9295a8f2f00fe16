"""Atomic, resumable checkpoints: a directory per step, written under a temporary name and renamed when complete.

    ckpt_root/
      step_00000010/   trainer_state.pt (args, step, optimizer, RNG, git commit) + whatever the script writes
      step_00000020/
      latest           text file naming the newest complete step directory

Nothing a user made is lost: re-saving a step renames the old copy aside (`.old_step_*`) until the new one is in
place, pruning never removes the step `latest` names, a write error removes only the partial temporary directory,
and `check_run_dir` refuses to start a new run over an earlier run's checkpoints.
"""

import dataclasses
import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
LOCK_FILE = "run.lock"  # held by rank 0 of the job training in this run directory (see lock_run_dir)
INFO_FILE = "args.json"  # args, step, script and git commit in plain JSON: read without loading the optimizer state
TMP_PREFIX, OLD_PREFIX = ".tmp_", ".old_"
WEIGHT_SETTINGS = ("model_path", "lora_rank", "lora_alpha")  # settings that shape or define the trained weights


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (damaged, from another script, or trained with other settings)."""


def git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_latest(ckpt_root: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_root, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _is_complete(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, STATE_FILE))


def step_dirs(ckpt_root: str) -> list[str]:
    """Names of the published step directories, oldest first (an empty list when the root does not exist)."""
    if not os.path.isdir(ckpt_root):
        return []
    names = os.listdir(ckpt_root)
    return sorted(d for d in names if d.startswith("step_") and os.path.isdir(os.path.join(ckpt_root, d)))


def _steps_on_disk(ckpt_root: str) -> list[str]:
    """Published steps plus the complete `.old_` copies a crashed re-save would put back (see `_clean_leftovers`)."""
    names = set(step_dirs(ckpt_root))
    if os.path.isdir(ckpt_root):
        names |= {
            d.removeprefix(OLD_PREFIX)
            for d in os.listdir(ckpt_root)
            if d.startswith(OLD_PREFIX + "step_") and _is_complete(os.path.join(ckpt_root, d))
        }
    return sorted(names)


def _clean_leftovers(ckpt_root: str) -> None:
    """Undo what a crashed save left behind: partial `.tmp_*` directories and stray `latest.tmp*` files are removed;
    an `.old_step_*` copy is removed when its step is published again, or put back when the crash came between the
    two renames of a re-save (see `resolve_checkpoint`)."""
    for entry in os.listdir(ckpt_root):
        path = os.path.join(ckpt_root, entry)
        if entry.startswith((TMP_PREFIX, "latest.tmp")) and os.path.isdir(path):
            shutil.rmtree(path)
        elif entry.startswith((TMP_PREFIX, "latest.tmp")):
            os.remove(path)
        elif entry.startswith(OLD_PREFIX):
            final = os.path.join(ckpt_root, entry[len(OLD_PREFIX) :])
            if os.path.exists(final) or not _is_complete(path):
                shutil.rmtree(path)
            else:
                os.replace(path, final)


def _disk_full(error: BaseException, directory: str) -> bool:
    """A write failed for lack of space: ENOSPC/EDQUOT, or a library's own error (torch.save reports a full disk as
    "unexpected pos", safetensors as "os error 28") while next to no space is left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left" in text or "os error 28" in text or shutil.disk_usage(directory).free < 16 * 2**20


def _write_error(error: BaseException, final: str, full: bool) -> OSError:
    if full:
        free = shutil.disk_usage(os.path.dirname(final)).free / 2**30
        message = (
            f"no space left on device while writing checkpoint {final} ({free:.1f} GiB free after removing "
            f"the partial copy): free space or change --run-dir. The previous checkpoint is intact."
        )
        return OSError(errno.ENOSPC, message)
    return OSError(
        getattr(error, "errno", None),
        f"could not write checkpoint {final}: {error}. The previous checkpoint is intact.",
    )


def save_checkpoint(ckpt_root: str, step: int, write_fn: Callable[[str], None], keep_last: Optional[int] = None) -> str:
    """Call `write_fn(tmp_dir)` to write every file, then atomically publish it as `ckpt_root/step_XXXXXXXX`.

    A crash at any point leaves the previous checkpoint or the new one, never a half-written one: a re-saved step is
    renamed to `.old_step_*` and removed only after the new copy and `latest` are in place. A write error (a full
    disk) removes the partial directory and raises an OSError that says what to do; `latest` is left unchanged.
    Pruning keeps the `keep_last` newest steps by name and never the step `latest` names."""
    os.makedirs(ckpt_root, exist_ok=True)
    _clean_leftovers(ckpt_root)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(ckpt_root, name), os.path.join(ckpt_root, TMP_PREFIX + name)
    old = os.path.join(ckpt_root, OLD_PREFIX + name)
    try:
        os.makedirs(tmp)
        write_fn(tmp)
    except Exception as e:
        full = _disk_full(e, ckpt_root)
        shutil.rmtree(tmp, ignore_errors=True)  # do not keep the space a partial checkpoint holds
        if full or isinstance(e, OSError):
            raise _write_error(e, final, full) from e
        raise
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): the old copy stays until the new is in
        os.replace(final, old)
    os.replace(tmp, final)
    try:
        write_text_atomic(os.path.join(ckpt_root, "latest"), name + "\n")
    except OSError as e:
        raise _write_error(e, os.path.join(ckpt_root, "latest"), _disk_full(e, ckpt_root)) from e
    shutil.rmtree(old, ignore_errors=True)
    if keep_last:
        steps = step_dirs(ckpt_root)
        keep = set(steps[-keep_last:]) | {name, _read_latest(ckpt_root)}
        for stale in steps:
            if stale not in keep:
                shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)
    return final


def _recover(ckpt_root: str, name: str) -> Optional[str]:
    """The complete copy of step `name`: the published one, or the `.old_` copy of a re-save that crashed between
    its two renames, which is put back (when the directory is writable; otherwise it is used where it is)."""
    final, old = os.path.join(ckpt_root, name), os.path.join(ckpt_root, OLD_PREFIX + name)
    if _is_complete(final):
        return final
    if _is_complete(old):
        try:
            os.replace(old, final)
        except FileNotFoundError:  # another rank put it back first
            pass
        except OSError:
            return old
        return final if _is_complete(final) else None
    return None


def resolve_checkpoint(path: str, flag: str = "--resume") -> str:
    """A step directory, or a checkpoint root whose `latest` file names one. When the step `latest` names is missing
    (deleted by hand), the newest complete step is used, with a warning."""
    if _is_complete(path):
        return path
    parent, name = os.path.split(os.path.normpath(path))
    found = _recover(parent, name) if name.startswith("step_") else None  # a re-save crashed between its renames
    if found is not None:
        return found
    latest = _read_latest(path)
    if latest is not None:
        found = _recover(path, latest)
        if found is not None:
            return found
        for name in reversed(step_dirs(path)):
            if _is_complete(os.path.join(path, name)):
                warnings.warn(
                    f"{flag} {path}: `latest` names {latest}, which is missing or incomplete; using {name}",
                    stacklevel=2,
                )
                return os.path.join(path, name)
    raise FileNotFoundError(
        f"{flag} {path!r}: not a checkpoint. Pass a step directory containing {STATE_FILE} "
        f"(e.g. runs/NAME/checkpoints/step_00000010) or a checkpoints directory containing a `latest` file."
    )


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # plain lists: loadable with weights_only
    numpy_state = (name, keys.tolist(), pos, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
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


def script_name() -> str:
    """The file name of the running script (under torchrun too): what `trainer_state` records as "script"."""
    return os.path.basename(sys.argv[0])


def trainer_state(
    args, step: int, optimizer: Optional[torch.optim.Optimizer | dict], script: Optional[str] = None, **extra
) -> dict[str, Any]:
    """Everything besides the weights that a resume needs, plus the settings, script and code version that produced
    it (`script` defaults to the running script's file name). optimizer: an optimizer, or its state dict already
    gathered (common.fsdp.full_optimizer_state_dict)."""
    return {
        "args": dataclasses.asdict(args),
        "script": script or script_name(),
        "step": step,
        "optimizer": optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer,
        "rng": rng_state(),
        "git_commit": git_commit(),
        **extra,
    }


def save_trainer_state(directory: str, state: dict[str, Any]) -> None:
    torch.save(state, os.path.join(directory, STATE_FILE))
    info = {key: state.get(key) for key in ("script", "step", "git_commit", "args")}
    with open(os.path.join(directory, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)


def load_trainer_state(directory: str, mmap: bool = False) -> dict[str, Any]:
    """The trainer state on the CPU, loaded with `weights_only=True`: tensors and plain Python values only, so a
    trainer_state.pt that someone else wrote cannot run code while it is read. A file the safe loader refuses is
    refused here, never retried with the full unpickler. mmap: tensors are read on first use and ranks loading the
    same file share the page cache (for a gathered full fine-tuning optimizer state)."""
    path = os.path.join(directory, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(_damaged(path, e)) from e
        reason = next((line for line in str(e).splitlines() if "unsupported global" in line.lower()), "")
        raise CheckpointError(
            f"{path}: refused: {STATE_FILE} holds Python objects besides tensors and plain values, and unpickling "
            f"them could run any code ({reason.strip() or 'not loadable with weights_only=True'}). A checkpoint this "
            f"project wrote before its RNG state was stored as plain lists looks like this; if you made it yourself, "
            f"convert it once with `python -m common.checkpoint --convert-trusted {directory}`. Never convert a file "
            f"you did not make."
        ) from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(_damaged(path, e)) from e


def convert_trusted_trainer_state(directory: str) -> None:
    """Rewrite an older trainer_state.pt (numpy RNG state as a numpy object) so the safe loader takes it. This runs
    the full unpickler on the file: only for checkpoints you wrote yourself."""
    path = os.path.join(directory, STATE_FILE)
    state = torch.load(path, map_location="cpu", weights_only=False)
    name, keys, pos, has_gauss, cached_gaussian = state["rng"]["numpy"]
    state["rng"]["numpy"] = (str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached_gaussian))
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    torch.load(tmp, map_location="cpu", weights_only=True)  # what was left besides the RNG state fails here
    os.replace(tmp, path)


def read_checkpoint_info(step_dir: str) -> dict[str, Any]:
    """args, step, script, git_commit of a checkpoint, from args.json (cheap) or else from the trainer state."""
    path = os.path.join(step_dir, INFO_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(_damaged(path, e)) from e
    state = load_trainer_state(step_dir)
    return {key: state.get(key) for key in ("script", "step", "git_commit", "args")}


# ---------------------------------------------------------------------------------------------------------------
# Checks before any expensive work: the run directory, the checkpoint's settings, damaged weight files
# ---------------------------------------------------------------------------------------------------------------
def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _is_inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_run_dir(run_path: str, resume: Optional[str], overwrite: bool, eval_only: bool = False) -> None:
    """Refuse to start a run that would write over checkpoints a user made; check the run directory is writable.

    - a new run (no --resume) whose run directory already holds checkpoints;
    - --resume from another run into a run directory that holds checkpoints of its own;
    - --resume from an older step of this run while later steps exist (continuing would replace them).
    With `overwrite` the checkpoints in the way are deleted instead (by rank 0). --eval-only writes no checkpoints:
    only the writability check applies. Call it on every rank (it reads RANK from the environment)."""
    ckpt_root = os.path.join(run_path, "checkpoints")
    steps = _steps_on_disk(ckpt_root)
    in_the_way, replace_all = [], False
    if steps and not eval_only:
        if resume and not os.path.basename(os.path.normpath(resume)).startswith(("step_", OLD_PREFIX)):
            resume = resolve_checkpoint(resume)
        if not resume:
            in_the_way, replace_all, reason = (
                steps,
                True,
                (
                    f"{run_path} already holds checkpoints of an earlier run ({len(steps)}, newest {steps[-1]}): pass "
                    f"--resume {ckpt_root} to continue it, a new --exp-name to start another run, or --overwrite to "
                    f"delete them and start over"
                ),
            )
        elif not _is_inside(resume, ckpt_root):
            in_the_way, replace_all, reason = (
                steps,
                True,
                (
                    f"--resume {resume} would continue into {run_path}, which holds checkpoints of another run "
                    f"({len(steps)}, newest {steps[-1]}): pass a new --exp-name, or --overwrite to delete them"
                ),
            )
        else:
            resumed = os.path.basename(os.path.normpath(os.path.realpath(resume))).removeprefix(OLD_PREFIX)
            in_the_way = [name for name in steps if name > resumed]
            reason = (
                f"--resume {resume} is not the newest checkpoint of {run_path}: continuing would replace the "
                f"later {', '.join(in_the_way)}. Pass --resume {ckpt_root} to continue from the newest, a new "
                f"--exp-name to branch into another run, or --overwrite to delete the later steps"
            )
    if in_the_way and not overwrite:
        raise CheckpointError(reason)
    if in_the_way and _is_main_process():
        if replace_all:
            shutil.rmtree(ckpt_root)
            for entry in os.listdir(run_path):  # the old run's TensorBoard curves would mix with the new ones
                if entry.startswith("events.out.tfevents."):
                    os.remove(os.path.join(run_path, entry))
        for name in [] if replace_all else in_the_way:
            for copy in (name, OLD_PREFIX + name):
                shutil.rmtree(os.path.join(ckpt_root, copy), ignore_errors=True)
    probe = os.path.join(run_path, f".write_test_{os.getpid()}")
    try:
        os.makedirs(run_path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise _not_writable(run_path, e) from e


def _not_writable(run_path: str, error: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write to the run directory {run_path} ({error.strerror or error}): pass a writable --run-dir"
    )


def _model_id(path: str) -> str:
    """`org/name` of a Hugging Face cache snapshot path, else the directory's name: the same model stored
    elsewhere (another machine, another cache) is still the same model."""
    parts = os.path.normpath(str(path)).split(os.sep)
    for part in parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return parts[-1]


def _same_setting(key: str, saved, current) -> bool:
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return list(saved) == list(current)
    if key == "model_path" and saved is not None and current is not None:
        return str(saved) == str(current) or _model_id(saved) == _model_id(current)
    return saved == current


def check_checkpoint_compatible(
    step_dir: str, script: str, args, keys: Iterable[str] = WEIGHT_SETTINGS, flag: str = "--resume"
) -> None:
    """Refuse a checkpoint of another script, or one trained with settings (`keys`: what shapes or defines the
    weights) that differ from this run's, naming the setting, both values and the fix. Reads args.json only.
    A checkpoint written before the script was recorded skips that check."""
    info = read_checkpoint_info(step_dir)
    saved_script = info.get("script")
    if saved_script and saved_script != script:
        raise CheckpointError(
            f"{flag} {step_dir} is a checkpoint of {saved_script}, not {script}: resume it with "
            f"`python {saved_script} {flag} {step_dir}`, or start a new run of {script} without "
            f"{flag}"
        )
    saved_args = info.get("args") or {}
    for key in keys:
        if key not in saved_args:
            continue
        saved, current = saved_args[key], getattr(args, key)
        if not _same_setting(key, saved, current):
            option = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"{option} {current} but the checkpoint {step_dir} was trained with {option} "
                f"{saved}: pass {option} {saved} or start a new run without {flag}"
            )


def check_run_flags(args, script: str, inherited: tuple[str, ...]) -> str:
    """Every check on --resume / --eval-only / --checkpoint / --run-dir / --overwrite, before anything expensive;
    returns the run directory {run_dir}/{exp_name}__s{seed}.

    Resolves --resume and --checkpoint to step directories; for --eval-only --checkpoint, the settings that define the
    trained model (`inherited`, e.g. model_path and lora_rank) are taken from the checkpoint, so the evaluated model
    is the one that was trained. A --resume checkpoint must come from this script with the same weight settings, its
    weight files must be intact, and a new run must not write over an earlier run's checkpoints."""
    if args.eval_only and args.resume:
        raise ValueError("--eval-only evaluates --checkpoint; do not combine it with --resume")
    if args.checkpoint and not args.eval_only:
        raise ValueError("--checkpoint is for --eval-only; use --resume to continue training")
    run_path = os.path.join(args.run_dir, f"{args.exp_name}__s{args.seed}")
    if not args.eval_only:  # before anything is read or deleted: a second job into this directory stops here
        lock_run_dir(run_path)
    try:
        if args.resume == "auto":  # what an automatic restart passes: continue this run if it has saved, else start
            ckpt_root = os.path.join(run_path, "checkpoints")
            args.resume = ckpt_root if _steps_on_disk(ckpt_root) else None
            if _is_main_process():
                found = f"continuing from {ckpt_root}" if args.resume else f"no checkpoint in {ckpt_root}, a new run"
                print(f"--resume auto: {found}", flush=True)
        if args.resume:
            args.resume = resolve_checkpoint(args.resume, "--resume")
            check_checkpoint_compatible(args.resume, script, args)
            verify_safetensors_files(args.resume)
        if args.checkpoint:
            args.checkpoint = resolve_checkpoint(args.checkpoint, "--checkpoint")
            check_checkpoint_compatible(args.checkpoint, script, args, keys=(), flag="--checkpoint")
            verify_safetensors_files(args.checkpoint)
            saved = read_checkpoint_info(args.checkpoint)["args"]
            for key in inherited:
                setattr(args, key, saved[key])
        check_run_dir(run_path, args.resume, args.overwrite, eval_only=args.eval_only)
    except BaseException:
        unlock_run_dir(run_path)  # refused: the directory is free again
        raise
    return run_path


_HELD_LOCKS: dict[str, int] = {}  # run directory -> file descriptor of the lock this process holds


def lock_run_dir(run_path: str) -> None:
    """Rank 0 takes an exclusive lock (`fcntl.flock`) on {run_path}/run.lock and holds it until `unlock_run_dir` or
    its exit, however it exits: the kernel drops the lock of a dead process, so a crashed or killed job never blocks
    its own restart. A second job into the same directory is refused, naming the holder (host, pid, start time,
    command) written in the file. Other ranks do nothing. Taking it again in the process that holds it is a no-op."""
    if not _is_main_process():
        return
    path = os.path.join(run_path, LOCK_FILE)
    key = os.path.realpath(path)
    if key in _HELD_LOCKS:
        return
    try:
        os.makedirs(run_path, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _not_writable(run_path, e) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CheckpointError(
            f"{run_path} is in use by another job ({holder}): two jobs in one run directory would overwrite each "
            f"other's checkpoints. Wait for that job to end (or stop it), or pass a new --exp-name / --run-dir"
        ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    holder = f"host {socket.gethostname()}, pid {os.getpid()}, started {started}, command: {' '.join(sys.argv)}"
    os.ftruncate(fd, 0)
    os.write(fd, (holder + "\n").encode())
    _HELD_LOCKS[key] = fd


def unlock_run_dir(run_path: str) -> None:
    """Release the lock `lock_run_dir` took (the file stays; a new job takes it again)."""
    fd = _HELD_LOCKS.pop(os.path.realpath(os.path.join(run_path, LOCK_FILE)), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def _earlier_checkpoint_hint(path: str) -> str:
    """Which checkpoint to use instead of the damaged file's one."""
    step_dir = os.path.dirname(os.path.abspath(path))
    while step_dir != os.path.dirname(step_dir) and not os.path.basename(step_dir).startswith("step_"):
        step_dir = os.path.dirname(step_dir)
    if not os.path.basename(step_dir).startswith("step_"):
        return "replace the file (download or copy it again)"
    root, name = os.path.split(step_dir)
    earlier = [d for d in step_dirs(root) if d < name and _is_complete(os.path.join(root, d))]
    if earlier:
        return f"resume from the earlier checkpoint {os.path.join(root, earlier[-1])}"
    return f"no earlier checkpoint exists in {root}: start a new run"


def _damaged(path: str, error) -> str:
    return f"{path}: the checkpoint is damaged ({error}); {_earlier_checkpoint_hint(path)}"


_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _check_safetensors_header(path: str) -> None:
    """Validate a .safetensors file from its header alone: the 8-byte header length, the JSON header, and the file
    size against the end of the last tensor's data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(_damaged(path, f"{size} bytes, shorter than a safetensors header"))
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 2**20):
            raise CheckpointError(_damaged(path, f"header length {header_len} does not fit the file of {size} bytes"))
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(_damaged(path, f"unreadable header: {e}")) from e
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, stop = entry["data_offsets"]
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        if entry["dtype"] in _DTYPE_BYTES and stop - begin != numel * _DTYPE_BYTES[entry["dtype"]]:
            shape = entry["shape"]
            raise CheckpointError(_damaged(path, f"tensor {name!r} has {stop - begin} bytes for shape {shape}"))
        end = max(end, stop)
    if size != 8 + header_len + end:
        raise CheckpointError(
            _damaged(path, f"truncated or padded: {size} bytes, the header describes {8 + header_len + end}")
        )


def verify_safetensors_files(directory: str) -> int:
    """Check every .safetensors file under `directory` (recursively) from its header and size, and that the shards
    a `*.safetensors.index.json` names exist, without loading any weights. Returns the number of files checked."""
    checked = 0
    for root, _, files in os.walk(directory):
        for file in sorted(files):
            path = os.path.join(root, file)
            if file.endswith(".safetensors"):
                _check_safetensors_header(path)
                checked += 1
            elif file.endswith(".safetensors.index.json"):
                with open(path) as f:
                    shards = set(json.load(f).get("weight_map", {}).values())
                missing = sorted(s for s in shards if not os.path.isfile(os.path.join(root, s)))
                if missing:
                    raise CheckpointError(_damaged(path, f"missing shard(s) {', '.join(missing)}"))
    return checked


def load_safetensors(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file that names the file and the checkpoint to use instead when it is missing,
    truncated or corrupted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(_damaged(path, "file missing"))
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(_damaged(path, e)) from e


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Checkpoint maintenance.")
    parser.add_argument(
        "--convert-trusted",
        metavar="STEP_DIR",
        required=True,
        help="rewrite the trainer_state.pt of a checkpoint you made with an earlier version so the safe loader "
        "takes it (runs the full unpickler on that file once)",
    )
    directory = parser.parse_args().convert_trusted
    convert_trusted_trainer_state(directory)
    print(f"{os.path.join(directory, STATE_FILE)}: converted; it now loads with weights_only=True")
