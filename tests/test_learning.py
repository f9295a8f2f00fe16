"""Learning test on the real simulator: GRPO from an SFT warm start beats an identical run with learning rate 0.

There is no PPO-from-scratch test here. One existed (tiny random OpenVLA, PushCube-v1 dense reward, 2 envs x
20 steps, lr 3e-4) and passed with gaps of 0.14-0.28 in "reward per step", but that scalar then included the
gamma V(final observation) folded into every truncated step, and the trained run's value head grows while the
control's stays near 0. With the env's reward alone (what rollout/reward_mean logs now) the same pair scores
0.067 vs 0.066 after 10 iterations, and 0.082 vs 0.055 after 20 iterations at lr 3e-3: no margin a test could
hold. What PPO's update does is checked in tests/test_update_direction.py.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str]) -> None:
    """Run a project script (path and flags) with this interpreter; fail with its output if it fails."""
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def scalar_curve(script: str, model_path: str, run_dir: str, name: str, flags: list[str], tag: str) -> list[float]:
    """Run a training script (seed 1) and return its TensorBoard scalar `tag` per iteration."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run([script, "--model-path", model_path, "--run-dir", run_dir, "--exp-name", name, *flags])
    events = EventAccumulator(os.path.join(run_dir, f"{name}__s1")).Reload()
    return [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]


# ---------------------------------------------------------------------------------------------------------------------
# GRPO from an SFT warm start raises PushCube-v1's success rate above its starting point
# ---------------------------------------------------------------------------------------------------------------------
GRPO_ITERATIONS, GRPO_LAST_K, GRPO_MARGIN = 12, 5, 0.08
GRPO_RUN = [
    "--env-id",
    "PushCube-v1",
    "--num-envs",
    "16",
    "--group-size",
    "8",
    "--num-initial-states",
    "1",
    "--max-episode-steps",
    "30",
    "--image-size",
    "64",
    "--lora-rank",
    "0",
    "--temperature",
    "1.0",
    "--loss-agg-mode",
    "seq-mean-token-mean",
    "--micro-batch-size",
    "32",
    "--total-iterations",
    str(GRPO_ITERATIONS),
    "--eval-interval",
    "0",
    "--save-interval",
    "0",
    "--keep-checkpoints",
    "1",
    "--seed",
    "1",
]


def test_grpo_from_sft_beats_its_learning_rate_zero_control(tmp_path):
    """30 scripted PushCube demos -> sft_internvl.py (12 epochs, no simulator eval) -> grpo_internvl.py on one fixed
    initial state (reset seed 0), 2 groups of 8 episodes per iteration at temperature 1.0, every episode weighing the
    same (--loss-agg-mode seq-mean-token-mean), lr 3e-4, next to the same command at lr 0 (the SFT policy, whose
    success on that state is ~0.36). Both runs draw the same episodes, so iteration 1 is identical.

    Measured, mean rollout success over the last 5 iterations, trained vs control (GRPO seeds, one SFT model):
        seed 1 (10 iterations): 0.55 vs 0.38    seed 2: 0.61 vs 0.36 (control: iterations 6-10)    seed 3: 0.70 vs 0.29
    so the test asks for a gap of GRPO_MARGIN = 0.08, about half the smallest. At lr 1e-3 the first updates knock the
    tiny model off (seed 2: 0.06 at iteration 6) and 10 iterations did not recover (0.34 vs 0.36). About 10 minutes on
    2 cores."""
    from common.models.tiny import make_tiny_internvl

    demos, runs = str(tmp_path / "demos"), str(tmp_path / "runs")
    run(
        ["collect_demos.py", "--env-id", "PushCube-v1", "--num-episodes", "30", "--image-size", "64"]
        + ["--max-episode-steps", "40", "--out-dir", demos]
    )
    base = make_tiny_internvl(str(tmp_path / "base"))
    run(
        ["sft_internvl.py", "--demos", demos, "--model-path", base, "--run-dir", runs, "--exp-name", "sft"]
        + ["--lora-rank", "0", "--num-epochs", "12", "--learning-rate", "1e-3", "--batch-size", "16"]
        + ["--micro-batch-size", "16", "--num-envs", "0", "--save-interval", "0", "--keep-checkpoints", "1"]
    )
    sft = os.path.join(runs, "sft__s1", "final")
    success = "rollout/success_rate"
    trained = scalar_curve("grpo_internvl.py", sft, runs, "trained", GRPO_RUN + ["--learning-rate", "3e-4"], success)
    control = scalar_curve("grpo_internvl.py", sft, runs, "control", GRPO_RUN + ["--learning-rate", "0"], success)
    assert len(trained) == len(control) == GRPO_ITERATIONS
    assert trained[0] == control[0]  # same episodes from the same SFT policy before the first update
    trained_tail = sum(trained[-GRPO_LAST_K:]) / GRPO_LAST_K
    control_tail = sum(control[-GRPO_LAST_K:]) / GRPO_LAST_K
    assert trained_tail > control_tail + GRPO_MARGIN, (
        f"success rate of the last {GRPO_LAST_K} iterations: trained {trained_tail:.3f}, control {control_tail:.3f} "
        f"(needs a gap > {GRPO_MARGIN}); trained {trained}, control {control}"
    )
