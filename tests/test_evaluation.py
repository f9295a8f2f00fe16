"""common/evaluation.py and common/eval_report.py: the interval, the test, the protocol table, the progress lines;
the W&B mirror of common/logger.py. The records the scripts write (two ranks included) are checked in the script
tests (tests/eval_checks.py)."""

import dataclasses
import io
import os
import re
import shlex
import sys
from typing import Optional

import numpy as np
import pytest
import tyro

from common import evaluation
from common.eval_report import by_task, table, two_proportion_p
from common.evaluation import PROTOCOLS, gather_episodes, match_protocol, wilson_interval
from common.logger import Logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wilson_interval_against_hand_worked_values():
    # p = k/n, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z / (1 + z^2/n) sqrt(p(1-p)/n + z^2/4n^2)
    for (k, n), (low, high) in {
        (5, 10): (0.2366, 0.7634),
        (0, 10): (0.0, 0.2775),
        (10, 10): (0.7225, 1.0),
        (1, 4): (0.0456, 0.6994),
        (45, 50): (0.7864, 0.9565),
    }.items():
        assert wilson_interval(k, n, z=1.96) == pytest.approx((low, high), abs=1e-4), (k, n)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no episodes: nothing known


def test_two_proportion_test_against_a_hand_worked_value():
    # 5/10 vs 9/10: pooled 0.7, se sqrt(0.7 * 0.3 * (1/10 + 1/10)) = 0.20494, z = 0.4 / 0.20494 = 1.9518
    assert two_proportion_p(5, 10, 9, 10) == pytest.approx(0.05096, abs=1e-4)
    assert two_proportion_p(3, 10, 3, 10) == pytest.approx(1.0)
    assert two_proportion_p(10, 10, 20, 20) == 1.0  # no failure on either side


def test_an_episode_run_twice_is_refused_and_the_report_table_adds_up():
    episodes = [{"task": "A", "seed": s, "success": s < 2, "length": 5} for s in range(4)]
    episodes += [{"task": "B", "seed": s, "success": True, "length": 3} for s in range(2)]
    assert gather_episodes(episodes) == episodes
    with pytest.raises(RuntimeError, match=r"more than once.*\('A', 3\)"):
        gather_episodes(episodes + [episodes[3]])
    stats = by_task(episodes)
    assert stats["A"]["successes"] == 2 and stats["B"]["successes"] == 2 and stats["overall"]["episodes"] == 6
    lines = table(stats, by_task(episodes[:4])).splitlines()
    assert lines[-1].startswith("overall") and "4/6" in lines[-1] and "2/4" in lines[-1]
    assert "-" in next(line for line in lines if line.startswith("B"))  # B is missing from the second


def documented_protocols() -> dict[str, str]:
    """protocol name -> the command of its row in docs/protocols.md."""
    with open(os.path.join(ROOT, "docs", "protocols.md")) as f:
        rows = re.findall(r"^\| `([\w.-]+)` \|[^|]*\| `([^`]+)` \|", f.read(), flags=re.M)
    return dict(rows)


def test_every_protocol_row_has_a_documented_command_that_matches_it():
    import ppo_openvla
    import srpo_openvla_oft

    scripts = {
        "ppo_openvla.py": (ppo_openvla.Args, ppo_openvla.EVAL_PROTOCOL_FLAGS),
        "srpo_openvla_oft.py": (srpo_openvla_oft.Args, srpo_openvla_oft.EVAL_PROTOCOL_FLAGS),
    }
    documented = documented_protocols()
    assert set(documented) == set(PROTOCOLS)
    for name, command in documented.items():
        words = shlex.split(command)
        script = next(w for w in words if w.endswith(".py"))
        cls, flags = scripts[script]
        args = tyro.cli(cls, args=words[words.index(script) + 1 :])
        assert args.eval_only and args.checkpoint
        if getattr(args, "task_ids", "") is None:
            args.task_ids = list(range(10))  # what validate() makes of the default for a 10-task suite
        assert match_protocol(script, {f: getattr(args, f) for f in flags}) == name, command
    # the defaults of a script are no anchor's protocol (PickCube-v1; LIBERO-10 with every task)
    defaults = {f: getattr(ppo_openvla.Args(), f) for f in scripts["ppo_openvla.py"][1]}
    assert match_protocol("ppo_openvla.py", defaults) == "custom"
    changed = {f: getattr(srpo_openvla_oft.Args(suite="libero_goal"), f) for f in scripts["srpo_openvla_oft.py"][1]}
    assert (
        match_protocol("srpo_openvla_oft.py", changed | {"task_ids": list(range(10))})
        == "simplevla-rl-srpo-libero_goal"
    )
    assert match_protocol("srpo_openvla_oft.py", changed | {"task_ids": [0, 1]}) == "custom"
    assert match_protocol("srpo_openvla_oft.py", changed | {"task_ids": list(range(10)), "center_crop": False}) == (
        "custom"
    )


def test_progress_in_a_log_file_is_plain_lines(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(evaluation.sys, "stderr", stream)
    monkeypatch.setattr(evaluation, "PROGRESS_LOG_S", 0.0)
    bar = evaluation.progress(4, "eval PushCube-v1", "episode", enabled=True)
    for done in range(4):
        evaluation.advance(bar, 1, f"success {done} of {done + 1}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines
    assert lines[-1].startswith("eval PushCube-v1: 100%") and "4/4" in lines[-1] and "success 3 of 4" in lines[-1]
    silent = io.StringIO()
    monkeypatch.setattr(evaluation.sys, "stderr", silent)
    bar = evaluation.progress(4, "eval", "episode", enabled=False)  # ranks other than 0
    evaluation.advance(bar, 4, "")
    bar.close()
    assert silent.getvalue() == ""


@dataclasses.dataclass
class TrackedArgs:
    track: bool = True
    wandb_project_name: str = "vla-rl-test"
    wandb_entity: Optional[str] = None
    eval_only: bool = False
    learning_rate: float = 3e-4


def test_track_mirrors_scalars_hyperparameters_and_videos_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional; requirements.txt installs it for this test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = Logger(str(tmp_path / "run__s1"), TrackedArgs())
    logger.log({"eval/success_rate": 0.375, "actor/pg_loss": -0.125}, 1)
    logger.video("eval/video", np.zeros((4, 32, 32, 3), dtype=np.uint8), 1)
    logger.close()
    (run,) = (tmp_path / "run__s1" / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")
    data = records.read_bytes()  # protobuf records: keys and JSON values appear as strings
    for text in (b"eval/success_rate", b"0.375", b"actor/pg_loss", b"learning_rate", b"vla-rl-test", b"eval/video"):
        assert text in data, text
    assert list(run.glob("files/media/videos/**/*.mp4"))
    assert (tmp_path / "run__s1" / "videos" / "eval_video_step1.mp4").exists()  # TensorBoard's side as before


def test_track_without_wandb_installed_fails_before_any_work(monkeypatch):
    import ppo_openvla

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match="--track logs to Weights & Biases, which is not installed: pip install wandb"):
        ppo_openvla.validate(ppo_openvla.Args(track=True), world_size=1)
    logger = Logger("unused", TrackedArgs(track=False), enabled=False)  # no --track, no wandb: nothing happens
    logger.close()
