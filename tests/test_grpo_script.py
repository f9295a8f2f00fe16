"""grpo_internvl.py as a subprocess on real ManiSkill (PushCube-v1, CPU) with a tiny InternVL."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_checks import check_evaluation
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.envs.maniskill import HELD_OUT_SEED_BASE
from common.models.tiny import make_tiny_internvl

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--env-id",
    "PushCube-v1",
    "--num-envs",
    "2",
    "--group-size",
    "2",
    "--max-episode-steps",
    "3",
    "--image-size",
    "64",
    "--micro-batch-size",
    "4",
    "--num-minibatches",
    "2",
    "--no-dynamic-sampling",
    "--save-interval",
    "1",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_internvl(str(tmp_path_factory.mktemp("internvl")))


def run(*args: str, launcher=(sys.executable,), timeout: int = 400) -> str:
    proc = subprocess.run(
        [*launcher, str(ROOT / "grpo_internvl.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_two_ranks_train_checkpoint_resume_eval(model_path, tmp_path):
    """torchrun with 2 gloo ranks: train, checkpoint, resume (replays exactly), then --eval-only on one process; the
    evaluation records of both, compared by common.eval_report."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    out = run(
        *TINY_RUN,
        "--model-path",
        model_path,
        "--total-iterations",
        "2",
        "--eval-interval",
        "2",
        "--capture-video",
        "--run-dir",
        str(first),
        launcher=torchrun,
    )
    assert "2 rank(s) x 2 envs = 4 episodes" in out and out.count("iter 1:") == 1  # rank 0 prints
    assert "iter 2:" in out and " eval " in out
    ckpts = first / "grpo_internvl__s1" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    state = torch.load(ckpts / "step_00000001" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and state["args"]["group_size"] == 2 and state["optimizer"]["param_groups"]
    assert (ckpts / "step_00000001" / "adapter_model.safetensors").exists()
    assert list((first / "grpo_internvl__s1" / "videos").glob("*.mp4"))
    logged = scalars(first / "grpo_internvl__s1")
    for tag in (
        "rollout/kept_groups_frac",
        "actor/pg_loss",
        "actor/clipfrac",
        "actor/skipped_steps",
        "rollout/success_rate",
        "eval/success_rate",
        "time/env_steps_per_s",
        "time/decode_tokens_per_s",
    ):
        assert tag in logged, tag
    assert logged["actor/samples"][1] > 0
    assert logged["actor/approx_kl"][1] == pytest.approx(0.0, abs=1e-6)  # rollout and training log-probs agree
    records, summary = check_evaluation(
        first / "grpo_internvl__s1", 2, 4, {tag: values[2] for tag, values in logged.items() if 2 in values}
    )
    assert [r["seed"] for r in records] == [HELD_OUT_SEED_BASE + i for i in range(4)]  # both ranks' episodes
    assert (first / "grpo_internvl__s1" / records[0]["video"]).exists()
    assert summary["flags"]["env_id"] == "PushCube-v1" and summary["flags"]["eval_temperature"] == 0.0

    # Resume from step 1 into a fresh run folder: it starts at iteration 2 and replays it exactly.
    out = run(
        *TINY_RUN,
        "--model-path",
        model_path,
        "--total-iterations",
        "2",
        "--eval-interval",
        "0",
        "--run-dir",
        str(resumed),
        "--resume",
        str(ckpts / "step_00000001"),
        launcher=torchrun,
    )
    assert "iter 2:" in out and "iter 1:" not in out
    assert (resumed / "grpo_internvl__s1" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    replay = scalars(resumed / "grpo_internvl__s1")
    assert set(replay["rollout/logprob_per_token"]) == {2}
    assert replay["rollout/logprob_per_token"][2] == pytest.approx(logged["rollout/logprob_per_token"][2], abs=1e-5)

    out = run(*TINY_RUN, "--eval-only", "--checkpoint", str(ckpts), "--run-dir", str(tmp_path / "eval"))
    assert '"eval/success_rate"' in out  # the model path and LoRA settings come from the checkpoint
    _, summary = check_evaluation(tmp_path / "eval" / "grpo_internvl__s1", 2, 2)
    assert summary["checkpoint"].endswith("step_00000002")

    chart = tmp_path / "compare.png"
    report = subprocess.run(
        [sys.executable, "-m", "common.eval_report", str(first / "grpo_internvl__s1")]
        + [str(tmp_path / "eval" / "grpo_internvl__s1" / "eval" / "step_00000002.summary.json")]
        + ["--out", str(chart)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    overall = [line for line in report.stdout.splitlines() if line.startswith("overall")]
    assert len(overall) == 1 and "/4" in overall[0] and "/2" in overall[0], report.stdout
    assert chart.stat().st_size > 1000


def test_cli_rejects_indivisible_groups():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "grpo_internvl.py"), "--num-envs", "6", "--group-size", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert proc.returncode != 0 and "--num-envs (6) must be a multiple of --group-size (4)" in proc.stderr
