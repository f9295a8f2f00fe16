"""sft_openvla_oft.py: chunk targets decode back to the demo commands through srpo_openvla_oft.py's conversion, and
the script end to end on a LeRobot dataset recorded from real LIBERO rollouts: the loss falls and the greedy chunk
accuracy rises, and srpo_openvla_oft.py evaluates the final model, loaded with --model-path alone."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_checks import check_evaluation

from common.envs.lerobot_dataset import LeRobotWriter

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # env steps per recorded episode: 17 chunk samples each


def demo_commands(steps: int, phase: float) -> np.ndarray:
    """LIBERO commands (steps, 7): a constant pose delta per episode (set by `phase`), gripper open (-1) for the first
    half, closed (+1) after."""
    pose = np.tile(0.6 * np.sin(phase + np.arange(6))[None], (steps, 1))
    gripper = np.where(np.arange(steps)[:, None] < steps // 2, -1.0, 1.0)
    return np.concatenate([pose, gripper], 1).astype(np.float32)


@pytest.fixture(scope="module")
def libero_dataset(tmp_path_factory) -> str:
    """Two 24-step libero_spatial task-0 episodes (init states 0 and 1) driven by `demo_commands`, recorded as a
    LeRobot dataset: every frame the policy would have seen (uncropped 224 x 224) and the command sent at it."""
    from common.envs.libero import LiberoVectorEnv, configure_rendering

    configure_rendering()
    root = str(tmp_path_factory.mktemp("libero_lerobot") / "dataset")
    envs = LiberoVectorEnv("libero_spatial", 2, camera_size=64, max_steps=STEPS, use_workers=False, center_crop=False)
    commands = np.stack([demo_commands(STEPS, 0.0), demo_commands(STEPS, 1.0)])  # (2, T, 7)
    _, instructions = envs.reset([0, 0], [0, 1], record_frames=True)
    for q in range(STEPS // 8):
        envs.step(commands[:, 8 * q : 8 * q + 8])
    writer = LeRobotWriter(root, fps=20, robot_type="panda")
    for i, frames in enumerate(envs.videos()):
        writer.add_episode(
            dict(rgb=frames[:STEPS], state=np.zeros((STEPS, 8)), action=commands[i], instruction=instructions[i])
        )
    writer.close()
    envs.close()
    return root


def test_chunk_targets_decode_to_the_demo_commands():
    """Command -> model convention -> normalised -> bins -> srpo_openvla_oft.py's bins_to_actions and
    to_libero_actions gives every pose dim back within one bin and the gripper command exactly."""
    from common.envs.demos import action_norm_stats
    from common.envs.libero import to_libero_actions
    from common.models.openvla import ActionTokenizer
    from sft_openvla_oft import chunk_starts, to_model_actions
    from srpo_openvla_oft import N_BINS, bins_to_actions

    commands = torch.from_numpy(np.concatenate([demo_commands(8, 0.3), demo_commands(8, 2.0)]))
    model = to_model_actions(commands, "libero")
    assert model[:, 6].tolist() == [1.0] * 4 + [0.0] * 4 + [1.0] * 4 + [0.0] * 4  # open (-1) -> 1, closed -> 0
    stats = action_norm_stats([{"action": model.numpy()}])["action"]
    tokenizer = ActionTokenizer(32064, N_BINS)
    bins = tokenizer.normalized_to_tokens(ActionTokenizer.normalize(model, stats)) - tokenizer.first_token  # (16, 7)
    policy = SimpleNamespace(first_action_token=tokenizer.first_token)
    back = to_libero_actions(bins_to_actions(bins[:8].flatten()[None], policy, tokenizer, stats))[0]  # (8, 7)
    q01, q99 = np.array(stats["q01"][:6]), np.array(stats["q99"][:6])
    target = np.clip(commands[:8, :6].numpy(), q01, q99)
    assert np.all(np.abs(back[:, :6] - target) <= (q99 - q01) / (N_BINS - 1) + 1e-6)
    assert np.array_equal(back[:, 6], commands[:8, 6].numpy())
    assert chunk_starts(16).tolist() == list(range(9)) and len(chunk_starts(7)) == 0


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


def test_sft_oft_learns_and_srpo_loads_the_final_model(libero_dataset, tiny_openvla, tmp_path):
    from common.models.openvla import ActionTokenizer, load_lora_adapter, load_openvla, make_trainable
    from sft_openvla_oft import Args, chunk_loss, load_samples
    from srpo_openvla_oft import N_BINS, OFTPolicy, load_action_stats

    eval_flags = ["--suite", "libero_spatial", "--task-ids", "0", "--num-envs", "1", "--eval-init-states", "1"]
    eval_flags += ["--max-episode-steps", "16", "--camera-size", "64", "--no-env-workers"]
    run(
        "sft_openvla_oft.py",
        "--dataset",
        libero_dataset,
        "--model-path",
        tiny_openvla,
        *eval_flags,
        "--lora-rank",
        "8",
        "--learning-rate",
        "3e-3",
        "--batch-size",
        "8",
        "--total-iterations",
        "40",
        "--eval-interval",
        "0",
        "--save-interval",
        "20",
        "--run-dir",
        str(tmp_path),
    )
    run_path = tmp_path / "sft_openvla_oft__s1"
    loss, accuracy = scalars(run_path, "actor/loss"), scalars(run_path, "actor/bin_accuracy")
    # the tiny 2-layer model learns each episode's bins (accuracy 0 -> 3/7 on this data), not yet every slot's
    assert np.mean(loss[-5:]) < loss[0] - 0.5, loss
    assert np.mean(accuracy[-5:]) > accuracy[0] + 0.3, accuracy
    check_evaluation(run_path, 40, 1, fields=("init_state",))

    # final/: the openvla-7b layout + dataset_statistics.json under libero_spatial_no_noops, which srpo's loader
    # picks by itself; it computes what the base model + the trained adapter computes
    final = run_path / "final"
    with open(final / "dataset_statistics.json") as f:
        assert list(json.load(f)) == ["libero_spatial_no_noops"]
    base, processor = load_openvla(tiny_openvla)
    tokenizer = ActionTokenizer(base.vocab_size, N_BINS)
    args = Args(dataset=(libero_dataset,), center_crop=True)
    data, norm_stats = load_samples(args, tokenizer)
    merged, _ = load_openvla(str(final))
    assert load_action_stats(str(final), merged.config, "libero_spatial", None) == norm_stats["action"]
    make_trainable(base, 8, 16)
    load_lora_adapter(base, str(run_path / "checkpoints" / "step_00000040"))
    prompt_ids, prompt_mask = processor.prompt_ids(data["instructions"][:2])
    pixel_values = processor.preprocess_images(data["rgb"][:2])
    with torch.no_grad():
        losses = [
            chunk_loss(
                OFTPolicy(m.eval(), processor.tokenizer.eos_token_id),
                prompt_ids,
                prompt_mask,
                pixel_values,
                data["bins"][:2],
            )[0]
            for m in (merged, base)
        ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)

    srpo_dir = tmp_path / "srpo"
    run("srpo_openvla_oft.py", "--model-path", str(final), *eval_flags, "--eval-only", "--run-dir", str(srpo_dir))
    check_evaluation(srpo_dir / "srpo_openvla_oft__s1", 0, 1, fields=("init_state",))
