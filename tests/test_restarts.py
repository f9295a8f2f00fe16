"""Jobs that restart themselves, and what a dead, hung or second job does: torchrun --max-restarts with --resume auto
after a rank is killed, a hung rank ending the job within --dist-timeout-s, two torchrun agents as two nodes, env
workers that never outlive a killed trainer, and the run-directory lock. CPU, gloo, tiny models, real simulators."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from common.checkpoint import CheckpointError, lock_run_dir, unlock_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def ppo_flags(model: str, run_dir: str) -> list[str]:
    """A PPO run small enough for a test: 1 env per rank, 4-step iterations, a checkpoint after every iteration."""
    return [
        "ppo_openvla.py",
        "--model-path",
        model,
        "--run-dir",
        run_dir,
        "--exp-name",
        "t",
        "--env-id",
        "PushCube-v1",
        "--num-envs",
        "1",
        "--num-steps",
        "4",
        "--max-episode-steps",
        "4",
        "--num-minibatches",
        "1",
        "--micro-batch-size",
        "4",
        "--lora-rank",
        "4",
        "--image-size",
        "64",
        "--eval-interval",
        "0",
        "--save-interval",
        "1",
    ]


# ------------------------------------------------------------------------------------------- processes, from /proc
def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    children, found, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def worker_of_rank(agent_pid: int, rank: int) -> int:
    """The training process torchrun's agent started for `rank` (its direct child with RANK=rank)."""
    for pid in _children().get(agent_pid, []):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    raise AssertionError(f"no worker of rank {rank} under {agent_pid}")


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(cmd: list[str]) -> subprocess.Popen:
    """PYTHONFAULTHANDLER: a process sent SIGABRT prints every thread's Python stack (see `finish`)."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The rest of the job's output once it ends. A job still running after `timeout` seconds fails the test with
    the Python stack of every process it started (SIGABRT to each), so a hang says where it hangs."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(5)
        kill_group(proc)
        raise AssertionError(f"still running after {timeout} s; stacks:\n{proc.communicate()[0][-20000:]}") from None


def read_until(proc: subprocess.Popen, pattern: str, lines: list[str]) -> str:
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"{pattern!r} never printed:\n{''.join(lines)[-3000:]}")


def kill_group(proc: subprocess.Popen) -> None:
    """Kill everything the command started, torchrun's workers included (they run in sessions of their own)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------------------- the tests
def test_torchrun_restarts_a_killed_rank_and_resume_auto_continues(tiny_openvla, tmp_path):
    """kill -9 of rank 1 in the middle of iteration 3: torchrun --max-restarts 1 relaunches the same command, which
    with --resume auto continues from the last complete checkpoint and ends at the requested step. (It hung in the
    full suite until init_dist gave each attempt its own store keys: see the next test.)"""
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    cmd += ppo_flags(tiny_openvla, str(tmp_path)) + ["--total-iterations", "4", "--resume", "auto"]
    proc, lines = start(cmd), []
    try:
        read_until(proc, r"saved .*step_00000002", lines)
        os.kill(worker_of_rank(proc.pid, 1), signal.SIGKILL)
        output = "".join(lines) + finish(proc, 420)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, output[-4000:]
    assert "--resume auto: no checkpoint" in output and "--resume auto: continuing from" in output
    resumed_at = int(re.search(r"resumed from \S*step_(\d+) at iteration", output).group(1))
    assert resumed_at >= 2  # nothing lost beyond the iteration that was running
    ckpts = tmp_path / "t__s1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert not [d for d in os.listdir(ckpts) if d.startswith(".tmp_")]  # no half-written checkpoint


RESTART_PROBE = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from common.dist import init_dist
rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if attempt == 1 and rank == 0:
    time.sleep(8)  # rank 1 reaches the store first, where the previous attempt's keys still are
init_dist(20)
dist.all_reduce(torch.ones(1))
print(f"attempt {{attempt}} rank {{rank}}: joined", flush=True)
if attempt == 0 and rank == 1:
    os._exit(1)  # a dead rank: torchrun relaunches both
dist.barrier()
dist.destroy_process_group()  # not left to interpreter exit: gloo can abort when its peer has already gone
"""


def test_a_restarted_attempt_never_dials_the_previous_attempts_ranks(tmp_path):
    """torchrun keeps its key-value store across --max-restarts attempts. With a plain env:// init, a rank of the
    second attempt that arrives before the others reads the first attempt's (dead) addresses and fails after the
    timeout ("connection refused"); init_dist gives every attempt its own keys, so the relaunch joins."""
    probe = tmp_path / "probe.py"
    probe.write_text(RESTART_PROBE.format(root=ROOT))
    proc = start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(probe)])
    output = finish(proc, 120)
    assert proc.returncode == 0, output[-12000:]
    assert "attempt 1 rank 0: joined" in output and "attempt 1 rank 1: joined" in output


def test_a_hung_rank_ends_the_job_within_the_dist_timeout(tiny_openvla, tmp_path):
    """SIGSTOP of rank 1 (a stuck process): rank 0 stops with an error naming itself and --dist-timeout-s, the job
    exits non-zero within that bound plus torchrun's --shutdown-timeout (5 s here, 30 by default), and no process of it
    is left, env workers included."""
    timeout_s = 10
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--shutdown-timeout", "5"]
    cmd += ppo_flags(tiny_openvla, str(tmp_path)) + ["--total-iterations", "1000", "--dist-timeout-s", str(timeout_s)]
    proc, lines = start(cmd), []
    try:
        read_until(proc, r"^iter 1:", lines)
        job = descendants(proc.pid)
        os.kill(worker_of_rank(proc.pid, 1), signal.SIGSTOP)
        stopped = time.time()
        output = "".join(lines) + finish(proc, timeout_s + 150)
        elapsed = time.time() - stopped
        left = wait_gone(job, 10)
    finally:
        kill_group(proc)
    assert proc.returncode != 0, output[-4000:]
    assert f"rank 0: a collective got no answer from another rank within --dist-timeout-s {timeout_s} s" in output
    assert elapsed < timeout_s + 60, (elapsed, output[-3000:])  # torchrun SIGKILLs the stopped rank 5 s later
    assert not left, f"processes of the job still running: {left}"


def test_two_torchrun_agents_train_and_save_one_run(tiny_openvla, tmp_path):
    """Two nodes as two torchrun agents on this machine (c10d rendezvous): one PPO run of 2 ranks trains and saves.
    (Continuing such a run is a relaunch with --resume auto, as in the restart test above.)"""
    port = free_port()
    procs = [
        start(
            [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
            + ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "run"]
            + ppo_flags(tiny_openvla, str(tmp_path))
            + ["--total-iterations", "2", "--resume", "auto"]
        )
        for node in (0, 1)
    ]
    try:
        outputs = [finish(proc, 600) for proc in procs]
    finally:
        for proc in procs:
            kill_group(proc)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    assert "2 rank(s) x 1 envs" in "".join(outputs)
    assert (tmp_path / "t__s1" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.parametrize("simulator", ["maniskill", "libero"])
def test_sigkill_of_a_script_leaves_no_env_worker(simulator, tiny_openvla, tiny_oft, tiny_vjepa2, tmp_path):
    """kill -9 of the trainer, which no handler sees: its env workers (ManiSkill CPU workers under their forkserver,
    LIBERO worker processes) exit with it."""
    if simulator == "maniskill":
        cmd = [sys.executable, *ppo_flags(tiny_openvla, str(tmp_path))]
        cmd += ["--num-envs", "2", "--total-iterations", "1000", "--save-interval", "0"]
    else:
        cmd = [sys.executable, "srpo_openvla_oft.py", "--model-path", tiny_oft, "--world-model-path", tiny_vjepa2]
        cmd += ["--suite", "libero_spatial", "--task-ids", "0", "--num-envs", "2", "--group-size", "2"]
        cmd += ["--tasks-per-iteration", "1", "--no-dynamic-sampling", "--max-episode-steps", "16", "--lora-rank", "4"]
        cmd += ["--camera-size", "64", "--total-iterations", "1000", "--eval-interval", "0", "--save-interval", "0"]
        cmd += ["--run-dir", str(tmp_path)]
    proc = start(cmd)
    try:  # kill while the workers build their scenes: busy, they would notice a closed pipe only when done
        deadline, workers = time.time() + 300, []
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [p for p in descendants(proc.pid) if simulator == "libero" or p not in _children()[proc.pid]]
        assert len(workers) >= 2, f"no env workers appeared: {proc.communicate()[0][-3000:]}"
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = wait_gone(workers, 15)  # one that had not yet run exit_with_parent finishes its imports first
    finally:
        kill_group(proc)
    assert not left, f"env workers still running 15 s after the trainer was killed: {left}"


def test_exit_with_parent_takes_a_busy_worker_along():
    """The mechanism under the workers: a child that called exit_with_parent and then stays busy (as a worker
    building its scenes, which would notice a closed pipe only when done) dies with its parent's kill -9."""
    child = (
        "import os, time; from common.guards import exit_with_parent; exit_with_parent(os.getppid()); "
        "print('ready', flush=True); time.sleep(60)"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child_pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"  # the child (sharing the pipe) has called exit_with_parent
    assert alive(child_pid)
    proc.kill()
    proc.wait(timeout=30)
    assert not wait_gone([child_pid], 3), "the busy child outlived its killed parent"


def test_an_idle_forkserver_worker_exits_with_the_trainer():
    """The ManiSkill workers' forkserver exits with a trainer killed with kill -9, and with it a worker that waits on
    its queue (as the pool worker that probes the env spaces: it holds its queue's write end, so it never reads EOF).
    Without the server's own exit_with_parent the server outlives the trainer (each process it forked holds its
    "alive" pipe), and so do the workers that would die with it."""
    trainer = (
        "import concurrent.futures, os, time\n"
        "from common.envs.maniskill import _forkserver\n"
        "from common.guards import exit_with_parent\n"
        "pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=_forkserver())\n"
        "pool.submit(exit_with_parent, os.getpid()).result()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", trainer], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        started = descendants(proc.pid)  # resource tracker, forkserver, pool worker
        assert len(started) >= 3, started
        proc.kill()
        proc.wait(timeout=30)
        left = wait_gone(started, 10)
    finally:
        kill_group(proc)
    assert not left, f"still running 10 s after the trainer was killed: {left}"


def test_the_run_directory_lock_refuses_a_second_job_and_not_a_dead_ones(tmp_path):
    run_path = str(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from common.checkpoint import lock_run_dir; lock_run_dir({run_path!r}); print('held', flush=True); "
            "input()",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"in use by another job \(host \S+, pid {holder.pid}, started"):
            lock_run_dir(run_path)
        holder.kill()  # a crashed job: its lock dies with it
        holder.wait(timeout=30)
        lock_run_dir(run_path)
        lock_run_dir(run_path)  # this process holds it already: no error
        unlock_run_dir(run_path)
    finally:
        holder.kill()
