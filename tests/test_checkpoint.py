"""Nothing a user made is lost: crash-safe re-saves, pruning, the run-directory guard, full disks, non-finite
values, preemption signals, incompatible and damaged checkpoints."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from typing import Optional

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.checkpoint import (
    STATE_FILE,
    CheckpointError,
    check_checkpoint_compatible,
    check_run_dir,
    check_run_flags,
    convert_trusted_trainer_state,
    load_safetensors,
    load_trainer_state,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
    save_trainer_state,
    step_dirs,
    trainer_state,
    unlock_run_dir,
    verify_safetensors_files,
)
from common.guards import NonFiniteGuard, check_finite_state, named_state_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_payload(text: str):
    def write(directory: str) -> None:
        with open(os.path.join(directory, "payload"), "w") as f:
            f.write(text)
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            f.write("state")

    return write


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def leftovers(ckpt_root: str) -> list[str]:
    return sorted(e for e in os.listdir(ckpt_root) if e.startswith((".tmp_", ".old_", "latest.tmp")))


# --------------------------------------------------------------------------------------------- crash-safe saves
def wait_for(path: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def crashing_resave(ckpt_root: str, phase: str) -> None:
    """Re-save step 10 and die by SIGKILL in `phase` (the "writing" phase sleeps until killed from outside)."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    replaced = 0

    def replace(src, dst):  # a re-save renames: 1. the old copy aside, 2. the new copy in, 3. the `latest` file
        nonlocal replaced
        real_replace(src, dst)
        replaced += 1
        if phase == f"after_rename_{replaced}":
            os.kill(os.getpid(), signal.SIGKILL)

    def rmtree(path, *args, **kwargs):
        if phase == "removing_old" and os.path.basename(path).startswith(".old_"):
            os.remove(os.path.join(path, "payload"))  # half deleted
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)

    def write(directory: str) -> None:
        with open(os.path.join(directory, "payload"), "w") as f:
            f.write("new")
        if phase == "writing":
            open(ckpt_root + ".writing", "w").close()
            time.sleep(120)
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            f.write("state")

    os.replace, shutil.rmtree = replace, rmtree
    save_checkpoint(ckpt_root, 10, write)


def run_until_killed(ckpt_root: str, phase: str) -> int:
    """crashing_resave in a forked process; returns its exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            crashing_resave(ckpt_root, phase)
        finally:
            os._exit(1)  # never return into pytest
    if phase == "writing":
        wait_for(ckpt_root + ".writing")
        os.kill(pid, signal.SIGKILL)  # kill -9 while write_fn is still writing
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def check_run_dir_refuses(run_path: str) -> bool:
    try:
        check_run_dir(run_path, resume=None, overwrite=False)
    except CheckpointError:
        return True
    return False


# the copy a resume finds after a kill -9 in each phase of re-saving step 10
EXPECTED_AFTER_CRASH = {
    "writing": "old",
    "after_rename_1": "old",
    "after_rename_2": "new",
    "after_rename_3": "new",
    "removing_old": "new",
}


@pytest.mark.parametrize("phase", EXPECTED_AFTER_CRASH)
def test_kill_during_resave_leaves_a_complete_step_and_the_next_save_cleans_up(tmp_path, phase):
    ckpt_root = str(tmp_path / "checkpoints")
    save_checkpoint(ckpt_root, 5, write_payload("five"))
    save_checkpoint(ckpt_root, 10, write_payload("old"))
    assert run_until_killed(ckpt_root, phase) == -signal.SIGKILL
    expected = EXPECTED_AFTER_CRASH[phase]
    if phase == "after_rename_1":  # between the renames: the guard still sees the step, --resume STEP_DIR works
        assert check_run_dir_refuses(str(tmp_path))
        assert resolve_checkpoint(os.path.join(ckpt_root, "step_00000010")).endswith("step_00000010")
    step_dir = resolve_checkpoint(ckpt_root)
    assert os.path.basename(step_dir) == "step_00000010"
    assert read(os.path.join(step_dir, "payload")) == expected
    assert os.path.isfile(os.path.join(step_dir, STATE_FILE))

    save_checkpoint(ckpt_root, 11, write_payload("eleven"))
    assert leftovers(ckpt_root) == []
    assert step_dirs(ckpt_root) == ["step_00000005", "step_00000010", "step_00000011"]
    assert read(os.path.join(ckpt_root, "step_00000010", "payload")) == expected
    assert resolve_checkpoint(ckpt_root).endswith("step_00000011")


def test_resave_replaces_the_step_and_latest_stays_complete(tmp_path):
    root = str(tmp_path / "checkpoints")
    save_checkpoint(root, 10, write_payload("old"))
    save_checkpoint(root, 10, write_payload("new"))
    assert read(os.path.join(resolve_checkpoint(root), "payload")) == "new"
    assert leftovers(root) == [] and step_dirs(root) == ["step_00000010"]


def test_pruning_keeps_the_newest_and_never_the_step_latest_names(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (10, 20, 30, 40):
        save_checkpoint(root, step, write_payload(str(step)), keep_last=2)
    assert step_dirs(root) == ["step_00000030", "step_00000040"]
    # a run resumed from an older step (with --overwrite): the step just written and named by `latest` survives
    save_checkpoint(root, 15, write_payload("15"), keep_last=2)
    assert "step_00000015" in step_dirs(root)
    assert resolve_checkpoint(root).endswith("step_00000015")
    save_checkpoint(root, 16, write_payload("16"), keep_last=1)
    assert step_dirs(root) == ["step_00000016", "step_00000040"]


def test_latest_naming_a_missing_step_falls_back_to_the_newest_complete(tmp_path):
    root = str(tmp_path / "checkpoints")
    save_checkpoint(root, 1, write_payload("one"))
    save_checkpoint(root, 2, write_payload("two"))
    os.rename(os.path.join(root, "step_00000002"), str(tmp_path / "elsewhere"))
    with pytest.warns(UserWarning, match="step_00000002"):
        assert resolve_checkpoint(root).endswith("step_00000001")


def test_full_disk_removes_the_partial_copy_and_keeps_the_previous(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    save_checkpoint(root, 1, write_payload("one"))

    def write_until_full(directory: str) -> None:
        with open(os.path.join(directory, "weights.bin"), "wb") as f:
            f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on device while writing checkpoint .*step_00000002.*--run-dir"):
        save_checkpoint(root, 2, write_until_full)
    assert sorted(os.listdir(root)) == ["latest", "step_00000001"]
    assert read(os.path.join(resolve_checkpoint(root), "payload")) == "one"

    def torch_save_on_a_full_disk(directory: str) -> None:  # torch.save does not say ENOSPC
        os.makedirs(os.path.join(directory, "model"))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=4096))
    with pytest.raises(OSError, match="no space left on device while writing checkpoint .*step_00000002"):
        save_checkpoint(root, 2, torch_save_on_a_full_disk)
    monkeypatch.undo()
    assert sorted(os.listdir(root)) == ["latest", "step_00000001"]

    def bug(directory: str) -> None:
        raise KeyError("a bug in write_fn")

    with pytest.raises(KeyError, match="a bug"):  # not a disk problem: raised as it is, the partial copy removed
        save_checkpoint(root, 2, bug)
    assert sorted(os.listdir(root)) == ["latest", "step_00000001"]

    def write_denied(directory: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(OSError, match="could not write checkpoint"):  # re-saving step 1 keeps the old copy
        save_checkpoint(root, 1, write_denied)
    assert read(os.path.join(resolve_checkpoint(root), "payload")) == "one"


# --------------------------------------------------------------------------------------------- run directory
def test_run_dir_guard_refuses_new_runs_over_checkpoints_and_overwrite_deletes_them(tmp_path):
    run = str(tmp_path / "ppo__s1")
    check_run_dir(run, resume=None, overwrite=False)  # empty: fine, and created
    root = os.path.join(run, "checkpoints")
    for step in (1, 2, 3):
        save_checkpoint(root, step, write_payload(str(step)))
    (tmp_path / "ppo__s1" / "events.out.tfevents.1.host").write_text("old curves")
    refusal = r"already holds checkpoints .*--resume .*checkpoints.*--exp-name.*--overwrite"
    with pytest.raises(CheckpointError, match=refusal):
        check_run_dir(run, resume=None, overwrite=False)
    check_run_dir(run, resume=None, overwrite=False, eval_only=True)  # evaluation writes no checkpoints
    check_run_dir(run, resume=os.path.join(root, "step_00000003"), overwrite=False)  # continuing the newest
    with pytest.raises(CheckpointError, match="replace the later step_00000003"):
        check_run_dir(run, resume=os.path.join(root, "step_00000002"), overwrite=False)
    other = str(tmp_path / "other__s1" / "checkpoints")
    save_checkpoint(other, 7, write_payload("7"))
    with pytest.raises(CheckpointError, match="holds checkpoints of another run"):
        check_run_dir(run, resume=os.path.join(other, "step_00000007"), overwrite=False)

    check_run_dir(run, resume=os.path.join(root, "step_00000002"), overwrite=True)  # deletes only the later step
    assert step_dirs(root) == ["step_00000001", "step_00000002"]
    check_run_dir(run, resume=None, overwrite=True)
    assert step_dirs(root) == [] and not os.path.exists(os.path.join(root, "latest"))
    assert not any(e.startswith("events.out") for e in os.listdir(run))
    check_run_dir(run, resume=None, overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_run_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(CheckpointError, match="cannot write to the run directory .*writable --run-dir"):
        check_run_dir(str(locked / "run__s1"), resume=None, overwrite=False)


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write to the run directory .*writable --run-dir"):
        check_run_dir(str(tmp_path / "runs" / "run__s1"), resume=None, overwrite=False)


@dataclasses.dataclass
class RunArgs:
    run_dir: str
    exp_name: str = "ppo"
    seed: int = 1
    resume: Optional[str] = None
    eval_only: bool = False
    checkpoint: Optional[str] = None
    overwrite: bool = False
    model_path: str = "/models/openvla-7b"
    lora_rank: int = 4
    lora_alpha: int = 8


def test_resume_auto_starts_a_new_run_then_continues_its_own(tmp_path, capsys):
    """--resume auto, what an automatic restart passes: no checkpoint yet -> a new run; then the run's newest step."""
    args = RunArgs(run_dir=str(tmp_path), resume="auto")
    run_path = check_run_flags(args, "ppo_openvla.py", inherited=())
    assert args.resume is None and "no checkpoint in" in capsys.readouterr().out
    for step in (1, 2):
        save_checkpoint(
            os.path.join(run_path, "checkpoints"),
            step,
            lambda d, step=step: save_trainer_state(d, trainer_state(args, step, None, script="ppo_openvla.py")),
        )
    unlock_run_dir(run_path)  # as the first job does when it ends
    args = RunArgs(run_dir=str(tmp_path), resume="auto")
    check_run_flags(args, "ppo_openvla.py", inherited=())
    assert args.resume == os.path.join(run_path, "checkpoints", "step_00000002")
    assert "--resume auto: continuing from" in capsys.readouterr().out
    unlock_run_dir(run_path)


# --------------------------------------------------------------------------------------------- compatibility
@dataclasses.dataclass
class Args:
    model_path: str = "/cache/huggingface/hub/models--openvla--openvla-7b/snapshots/abc"
    lora_rank: int = 4
    lora_alpha: int = 8
    seed: int = 1


def saved_checkpoint(tmp_path, args: Args, script: str, optimizer=None) -> str:
    def write(directory: str) -> None:
        save_trainer_state(directory, trainer_state(args, 3, optimizer, script=script))

    return save_checkpoint(str(tmp_path / "checkpoints"), 3, write)


def test_checkpoint_compatibility_names_the_setting_and_the_fix(tmp_path):
    step_dir = saved_checkpoint(tmp_path, Args(), "ppo_openvla.py")
    check_checkpoint_compatible(step_dir, "ppo_openvla.py", Args(seed=2))
    moved = Args(model_path="/other/machine/hub/models--openvla--openvla-7b/snapshots/abc")  # same model elsewhere
    check_checkpoint_compatible(step_dir, "ppo_openvla.py", moved)
    with pytest.raises(
        CheckpointError,
        match="--lora-rank 8 but the checkpoint .* was trained with --lora-rank 4: "
        "pass --lora-rank 4 or start a new run",
    ):
        check_checkpoint_compatible(step_dir, "ppo_openvla.py", Args(lora_rank=8))
    with pytest.raises(CheckpointError, match="--model-path /models/other-vla but .*--model-path"):
        check_checkpoint_compatible(step_dir, "ppo_openvla.py", Args(model_path="/models/other-vla"))
    with pytest.raises(
        CheckpointError,
        match="checkpoint of ppo_openvla.py, not grpo_internvl.py: resume it with `python ppo_openvla.py",
    ):
        check_checkpoint_compatible(step_dir, "grpo_internvl.py", Args())
    os.remove(os.path.join(step_dir, "args.json"))  # an older checkpoint: read from the trainer state
    with pytest.raises(CheckpointError, match="--lora-alpha 16"):
        check_checkpoint_compatible(step_dir, "ppo_openvla.py", Args(lora_alpha=16))


def test_trainer_state_loads_with_weights_only_and_restores_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    torch.manual_seed(0)
    step_dir = saved_checkpoint(tmp_path, Args(), "ppo_openvla.py", optimizer)
    expected = torch.rand(3)
    state = torch.load(os.path.join(step_dir, STATE_FILE), map_location="cpu", weights_only=True)
    assert state["script"] == "ppo_openvla.py" and state["step"] == 3
    restore_rng(load_trainer_state(step_dir))
    torch.testing.assert_close(torch.rand(3), expected)
    torch.optim.AdamW(model.parameters()).load_state_dict(state["optimizer"])


def test_older_trainer_state_with_numpy_objects_is_refused_until_converted(tmp_path):
    torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="trainer_state.pt: refused.*--convert-trusted"):
        load_trainer_state(str(tmp_path))
    convert_trusted_trainer_state(str(tmp_path))
    state = load_trainer_state(str(tmp_path))
    assert state["step"] == 1
    np.random.set_state(state["rng"]["numpy"])  # the converted RNG state is still usable
    with open(tmp_path / STATE_FILE, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match="trainer_state.pt: the checkpoint is damaged"):
        load_trainer_state(str(tmp_path))


class _CreatesAFileWhenUnpickled:
    """What a malicious trainer_state.pt would carry: unpickling it calls a function of the author's choosing."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (shutil.copyfile, (os.devnull, self.target))


def test_a_crafted_trainer_state_is_refused_without_running_its_code(tmp_path):
    """A checkpoint someone else wrote is given to --resume: its pickle would create a file when unpickled. The
    resume refuses it, names trainer_state.pt, and the file is never created."""
    root = str(tmp_path / "checkpoints")
    step_dir = saved_checkpoint(tmp_path, Args(), "ppo_openvla.py")
    os.remove(os.path.join(step_dir, "args.json"))  # so the compatibility check also has to read the trainer state
    target = tmp_path / "created_by_the_checkpoint"
    torch.save({"step": 3, "payload": _CreatesAFileWhenUnpickled(str(target))}, os.path.join(step_dir, STATE_FILE))
    resumed = resolve_checkpoint(root)
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: refused.*could run any code"):
        check_checkpoint_compatible(resumed, "ppo_openvla.py", Args())
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: refused"):
        load_trainer_state(resumed)
    assert not target.exists()


# --------------------------------------------------------------------------------------------- damaged weights
def test_truncated_or_corrupted_safetensors_are_named(tmp_path):
    root = str(tmp_path / "checkpoints")
    tensors = {"a": torch.randn(64, 64), "b": torch.zeros(3, dtype=torch.bfloat16)}

    def write(directory: str) -> None:
        os.makedirs(os.path.join(directory, "model"))
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
        save_file(tensors, os.path.join(directory, "model", "model-00001-of-00001.safetensors"))
        with open(os.path.join(directory, "model", "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"a": "model-00001-of-00001.safetensors"}}, f)
        write_payload("x")(directory)

    save_checkpoint(root, 1, write)
    step2 = save_checkpoint(root, 2, write)
    assert verify_safetensors_files(step2) == 2
    adapter = os.path.join(step2, "adapter_model.safetensors")
    torch.testing.assert_close(load_safetensors(adapter)["a"], tensors["a"])

    with open(adapter, "r+b") as f:
        f.truncate(os.path.getsize(adapter) - 100)
    hint = "the checkpoint is damaged .*resume from the earlier checkpoint .*step_00000001"
    for check in (verify_safetensors_files, lambda d: load_safetensors(adapter)):
        with pytest.raises(CheckpointError, match=f"adapter_model.safetensors: {hint}"):
            check(step2)
    with open(adapter, "wb") as f:
        f.write(struct.pack("<Q", 40) + b"{not json")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: the checkpoint is damaged"):
        verify_safetensors_files(step2)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: the checkpoint is damaged"):
        load_safetensors(adapter)
    os.remove(adapter)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: the checkpoint is damaged .*file missing"):
        load_safetensors(adapter)
    os.remove(os.path.join(step2, "model", "model-00001-of-00001.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: .*missing shard"):
        verify_safetensors_files(step2)
    first = os.path.join(root, "step_00000001", "adapter_model.safetensors")
    with open(first, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match="no earlier checkpoint exists"):
        load_safetensors(first)


# --------------------------------------------------------------------------------------------- non-finite values
def test_nonfinite_guard_skips_counts_and_raises():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(max_in_a_row=3)
    before = model.weight.detach().clone()
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    assert not guard.step(optimizer, torch.tensor(1.0), torch.tensor(float("nan")))
    assert model.weight.grad is None and torch.equal(model.weight, before)
    assert not guard.step(optimizer, float("inf"), torch.tensor(1.0))
    model.weight.grad = torch.ones_like(model.weight)
    assert guard.step(optimizer, torch.tensor(0.5), torch.tensor(1.0))  # a finite step resets the run of skips
    assert not torch.equal(model.weight, before)
    assert (guard.skipped_steps, guard.in_a_row) == (2, 0)
    assert not guard.finite(torch.tensor(float("nan")), None)
    assert not guard.finite(torch.tensor(float("nan")), None)
    with pytest.raises(FloatingPointError, match="non-finite for 3 optimizer steps in a row.*--learning-rate"):
        guard.finite(torch.tensor(float("nan")), torch.tensor(2.0))
    assert guard.skipped_steps == 5


def test_check_finite_state_names_the_first_bad_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    check_finite_state(named_state_tensors(model, optimizer))
    names = [name for name, _ in named_state_tensors(model, optimizer)]
    assert names[:2] == ["1.weight", "1.bias"] and "optimizer state exp_avg of 1.weight" in names
    optimizer.state[model[1].bias]["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="optimizer state exp_avg_sq of 1.bias holds NaN/inf"):
        check_finite_state(named_state_tensors(model, optimizer))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not saving a checkpoint: 1.weight holds NaN/inf"):
        check_finite_state(named_state_tensors(model, optimizer))


# --------------------------------------------------------------------------------------------- preemption
STOPPABLE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch
    from common.checkpoint import STATE_FILE, save_checkpoint
    from common.dist import cleanup, init_dist
    from common.guards import NonFiniteGuard, StopRequest, check_finite_state

    out = sys.argv[1]
    rank = init_dist().rank
    # a NaN on one rank only: both ranks skip the step and both refuse to save
    guard = NonFiniteGuard()
    skipped = not guard.finite(torch.tensor(float("nan") if rank == 1 else 1.0), torch.tensor(1.0))
    try:
        check_finite_state([("w", torch.tensor([float("nan") if rank == 1 else 0.0]))])
        refused = False
    except FloatingPointError as e:
        refused = "w holds NaN" in str(e)
    stop = StopRequest(repeat_window_s=float(sys.argv[2]))
    iteration_s = float(sys.argv[3])
    for iteration in range(1, 1000):
        open(os.path.join(out, f"iter{{iteration}}_rank{{rank}}"), "w").close()
        time.sleep(iteration_s)  # the iteration's work; a signal lands here
        if stop.should_stop():
            break
    if rank == 0:
        write = lambda directory: torch.save({{}}, os.path.join(directory, STATE_FILE))  # noqa: E731
        save_checkpoint(os.path.join(out, "checkpoints"), iteration, write)
    with open(os.path.join(out, f"done_rank{{rank}}"), "w") as f:
        f.write(f"{{iteration}} {{stop.signal_name}} {{skipped}} {{refused}}")
    cleanup()
""")


def start_stoppable(tmp_path, launcher: list[str], repeat_window_s: float = 2.0, iteration_s: float = 0.3):
    program = tmp_path / "stoppable.py"
    program.write_text(STOPPABLE.format(root=ROOT))
    return subprocess.Popen(
        launcher + [str(program), str(tmp_path), str(repeat_window_s), str(iteration_s)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_finishes_the_iteration_saves_and_exits_0(tmp_path):
    proc = start_stoppable(tmp_path, [sys.executable])
    wait_for(str(tmp_path / "iter2_rank0"))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "received SIGTERM: finishing the current iteration" in out
    iteration, name, _, _ = read(str(tmp_path / "done_rank0")).split()
    assert name == "SIGTERM" and int(iteration) >= 2
    assert resolve_checkpoint(str(tmp_path / "checkpoints")).endswith(f"step_{int(iteration):08d}")


def test_second_sigint_stops_at_once(tmp_path):
    proc = start_stoppable(tmp_path, [sys.executable], repeat_window_s=0.0, iteration_s=5.0)
    wait_for(str(tmp_path / "iter1_rank0"))
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # two signals in one bytecode interval reach the handler once
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, out  # KeyboardInterrupt, as without the handler
    assert not os.path.exists(tmp_path / "done_rank0")


def test_torchrun_two_ranks_agree_on_stop_skip_and_refusal(tmp_path):
    """SIGTERM to torchrun (what Kubernetes does): it forwards it to its workers; both finish, save once, exit 0."""
    launcher = ["torchrun", "--standalone", "--nproc-per-node", "2", "--shutdown-timeout", "60"]
    proc = start_stoppable(tmp_path, launcher)
    try:
        wait_for(str(tmp_path / "iter2_rank0"))
        wait_for(str(tmp_path / "iter2_rank1"))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert "forcefully exiting" not in out, out
    results = [read(str(tmp_path / f"done_rank{rank}")).split() for rank in (0, 1)]
    assert results[0] == results[1], out  # same stopping iteration, same skip and refusal decisions
    iteration, name, skipped, refused = results[0]
    assert name == "SIGTERM" and skipped == "True" and refused == "True"
    assert resolve_checkpoint(str(tmp_path / "checkpoints")).endswith(f"step_{int(iteration):08d}")
