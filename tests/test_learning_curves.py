"""bench/learning_curves.py check: a stored result is stale when it records no provenance, when its recorded command
now parses to other settings, or when a file it depends on changed after its commit."""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from bench import learning_curves as lc


def parser() -> argparse.ArgumentParser:
    """learning_curves.py's own parser, captured from its main() without running a mode."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        lc.main()
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def write(tmp_path, name: str, commit: str | None, argv: list[str], settings: dict | None = None) -> str:
    p = parser()
    results = {"mode": argv[0], "settings": settings or vars(p.parse_args(argv))}
    if commit:
        results["provenance"] = {"commit": commit, "commit_date": "", "argv": argv}
    path = tmp_path / name / "curves.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    return str(path)


def test_check_tells_fresh_from_stale_results(tmp_path, capsys):
    head = lc.git("rev-parse", "HEAD")
    argv = ["ppo", "--out", str(tmp_path / "ppo"), "--seed", "2"]
    fresh = write(tmp_path, "fresh", head, argv)
    assert lc.check(parser(), [fresh]) == 0
    assert "ok" in capsys.readouterr().out

    os.makedirs(os.path.join(lc.ROOT, "runs"), exist_ok=True)
    inside = tempfile.mkdtemp(dir=os.path.join(lc.ROOT, "runs"))  # in the repository (git-ignored), as results are
    try:
        unrecorded = write(pathlib.Path(inside), "unrecorded", None, argv)
        assert lc.check(parser(), [unrecorded]) == 1
        assert "records no commit or command" in capsys.readouterr().out
    finally:
        shutil.rmtree(inside)

    settings = vars(parser().parse_args(argv)) | {"learning_rate": 1.0}  # a default that has changed since
    changed = write(tmp_path, "changed", head, argv, settings)
    assert lc.check(parser(), [changed]) == 1
    assert "learning_rate" in capsys.readouterr().out

    # the commit that added ppo_openvla.py: every later change to the PPO path makes the result stale
    if lc.git("rev-parse", "--is-shallow-repository") == "true":
        pytest.skip("a shallow clone has no history to compare against")
    first = lc.git("log", "--diff-filter=A", "--format=%H", "--", "ppo_openvla.py").splitlines()[-1]
    old = write(tmp_path, "old", first, argv)
    assert lc.check(parser(), [old]) == 1
    assert f"files it depends on changed after {first[:7]}" in capsys.readouterr().out


def test_a_result_depends_on_the_modules_its_scripts_import():
    files = lc.depends_on("sft-grpo")
    for path in ("sft_internvl.py", "grpo_internvl.py", "collect_demos.py", "common/envs/maniskill.py"):
        assert path in files
    assert "common/models/action_text.py" in files  # imported by both scripts
    assert "srpo_openvla_oft.py" not in files and "common/envs/libero.py" not in files


def test_spread_refuses_results_of_two_modes(tmp_path):
    a = write(tmp_path, "a", None, ["ppo", "--out", "x"])
    b = write(tmp_path, "b", None, ["sft-grpo", "--out", "y"])
    out = subprocess.run([sys.executable, "bench/learning_curves.py", "spread", a, b], cwd=lc.ROOT, capture_output=True)
    assert out.returncode != 0 and b"one mode" in out.stderr
