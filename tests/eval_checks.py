"""What the script tests check of an evaluation's records (common/evaluation.py)."""

import pytest

from common.evaluation import episode_key, eval_paths, read_evaluation, wilson_interval


def check_evaluation(run_path, step: int, episodes: int, logged: dict | None = None, fields: tuple = ()):
    """eval/step_XXXXXXXX.jsonl holds `episodes` distinct episodes with `fields`, its summary agrees with them (count,
    successes, Wilson interval, step, commit), and so does the logged eval/success_rate (`logged`: tag -> value at
    this step). Returns the records and the summary."""
    records, summary = read_evaluation(eval_paths(str(run_path), step)[0])
    assert len(records) == summary["episodes"] == episodes
    assert len({episode_key(r) for r in records}) == episodes  # none missing, none counted twice
    successes = sum(r["success"] for r in records)
    assert summary["successes"] == successes and summary["success_rate"] == successes / episodes
    assert summary["ci95"] == list(wilson_interval(successes, episodes))
    assert summary["step"] == step and summary["commit"] and summary["protocol"] == "custom"
    assert sum(t["episodes"] for t in summary["tasks"].values()) == episodes
    for field in ("task", "success", "length", "temperature", *fields):
        assert all(field in r for r in records), field
    if logged is not None:
        assert logged["eval/success_rate"] == pytest.approx(successes / episodes, abs=1e-6)
    return records, summary
