"""Scripted experts, the demo writer and its reader (CPU physics; the demo tests render with lavapipe)."""

import json
import os
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from common.envs.demos import action_norm_stats, load_demos
from common.envs.experts import EXPERTS
from common.envs.maniskill import INSTRUCTIONS, ManiSkillVLAEnv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env_id", sorted(EXPERTS))
def test_expert_succeeds_within_the_default_episode(env_id):
    import mani_skill.envs  # noqa: F401

    env = gym.make(env_id, num_envs=1, sim_backend="physx_cpu", obs_mode="state", control_mode="pd_ee_delta_pose")
    expert = EXPERTS[env_id]()
    for seed in range(4):
        env.reset(seed=seed)
        expert.reset()
        success = False
        for _ in range(gym.spec(env_id).max_episode_steps):
            action = expert.act(env.unwrapped)
            assert action.shape == (7,) and np.all(np.abs(action) <= 1)
            success = bool(env.step(action)[4]["success"][0])
            if success:
                break
        assert success, f"{env_id} seed {seed}"
    env.close()


@pytest.fixture(scope="module")
def push_demos(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("demos"))
    cmd = [
        sys.executable,
        "collect_demos.py",
        "--env-id",
        "PushCube-v1",
        "--num-episodes",
        "2",
        "--image-size",
        "64",
        "--out-dir",
        out,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def test_collect_demos_writes_the_documented_format(push_demos):
    with open(os.path.join(push_demos, "meta.json")) as f:
        meta = json.load(f)
    assert meta["env_id"] == "PushCube-v1" and meta["control_mode"] == "pd_ee_delta_pose"
    assert meta["num_episodes"] == 2 and meta["image_size"] == 64 and meta["max_episode_steps"] == 50
    assert sorted(os.listdir(push_demos)) == ["episode_000000.npz", "episode_000001.npz", "meta.json"]
    episodes = load_demos(push_demos)
    assert [e["seed"] for e in episodes] == [0, 1] and all(e["success"] for e in episodes)
    for e in episodes:
        steps = len(e["action"])
        assert 0 < steps <= 50 and e["instruction"] == INSTRUCTIONS["PushCube-v1"]
        assert e["rgb"].shape == (steps, 64, 64, 3) and e["rgb"].dtype == np.uint8
        assert e["tcp_pose"].shape == (steps, 7) and e["tcp_pose"].dtype == np.float32
        assert e["action"].shape == (steps, 7) and e["action"].dtype == np.float32
        assert np.all(np.abs(e["action"]) <= 1)
    assert meta["action_norm_stats"] == json.loads(json.dumps(action_norm_stats(episodes)))


def test_collect_demos_as_a_lerobot_dataset_reads_back_as_the_npz_demos(push_demos, tmp_path):
    """--format lerobot: the same episodes as the npz folder, bit for bit, through load_demos and the LeRobot reader."""
    out = str(tmp_path / "lerobot")
    cmd = [sys.executable, "collect_demos.py", "--env-id", "PushCube-v1", "--num-episodes", "2", "--image-size", "64"]
    subprocess.run(
        cmd + ["--out-dir", out, "--format", "lerobot"], cwd=ROOT, check=True, capture_output=True, timeout=300
    )
    info = json.loads(open(os.path.join(out, "meta", "info.json")).read())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20 and info["robot_type"] == "panda"
    assert info["features"]["observation.state"]["names"][:3] == ["x", "y", "z"]
    npz, lerobot = load_demos(push_demos), load_demos(out)
    assert len(lerobot) == len(npz) == info["total_episodes"]
    for a, b in zip(npz, lerobot):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta_npz, meta_lerobot = (json.load(open(os.path.join(d, "meta.json"))) for d in (push_demos, out))
    assert meta_lerobot.pop("format") == "lerobot" and meta_npz.pop("format") == "npz"
    assert meta_lerobot == meta_npz
    # So SFT trains on the same samples (and, with the same seed, in the same order: sft_openvla.batch_indices).
    import sft_openvla
    from common.models.openvla import ActionTokenizer

    tokenizer = ActionTokenizer(1024)
    (a, stats_a), (b, stats_b) = (sft_openvla.load_samples((d,), tokenizer) for d in (push_demos, out))
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["tokens"], b["tokens"]) and stats_a == stats_b
    assert a["instructions"] == b["instructions"]
    # A LeRobot dataset without collect_demos' meta.json (as from the hub): --from-lerobot imports it back
    bare = str(tmp_path / "bare")
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("meta.json"))
    imported = str(tmp_path / "imported")
    cmd = [sys.executable, "collect_demos.py", "--from-lerobot", bare, "--env-id", "PushCube-v1", "--out-dir", imported]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    for a, b in zip(load_demos(push_demos), load_demos(imported), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta_imported = json.load(open(os.path.join(imported, "meta.json")))
    assert meta_imported.pop("source") == bare and meta_imported.pop("format") == "npz" and meta_imported == meta_npz


def test_maniskill_trajectory_files_read_as_the_same_demos(push_demos, tmp_path):
    """ManiSkill's RecordEpisode h5 + json of the same expert episodes read back as collect_demos.py's episodes."""
    from mani_skill.utils.wrappers.record import RecordEpisode

    from common.envs.maniskill_h5 import load_trajectories

    make = dict(obs_mode="rgb", control_mode="pd_ee_delta_pose", reward_mode="sparse", render_mode="rgb_array")
    env = gym.make("PushCube-v1", sensor_configs=dict(width=64, height=64), **make)
    env = RecordEpisode(env, str(tmp_path), save_video=False, trajectory_name="trajectory", source_type="expert")
    expert = EXPERTS["PushCube-v1"]()
    for seed in (0, 1):
        env.reset(seed=seed)
        expert.reset()
        while True:
            *_, terminated, truncated, _ = env.step(expert.act(env.unwrapped))
            if terminated or truncated:
                break
    env.close()
    h5 = str(tmp_path / "trajectory.h5")
    for a, b in zip(load_demos(push_demos), load_trajectories(h5, INSTRUCTIONS["PushCube-v1"]), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(ValueError, match="replay it with .* -c pd_ee_delta_pose"):
        load_trajectories(h5, "push", control_mode="pd_joint_delta_pos")
    # collect_demos.py --from-trajectory writes them as the experts' demo folder: same episodes, same meta.json
    out = str(tmp_path / "imported")
    cmd = [sys.executable, "collect_demos.py", "--from-trajectory", h5, "--out-dir", out]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    for a, b in zip(load_demos(push_demos), load_demos(out), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    meta, imported = (json.load(open(os.path.join(d, "meta.json"))) for d in (push_demos, out))
    assert imported.pop("source") == h5 and imported == meta


def test_demo_frames_are_what_the_vla_env_shows(push_demos):
    """Same seed, same actions: ManiSkillVLAEnv returns the recorded images and TCP poses."""
    episode = load_demos(push_demos)[0]
    env = ManiSkillVLAEnv("PushCube-v1", num_envs=1, image_size=64, sim_backend="physx_cpu")
    try:
        obs = env.reset([episode["seed"]])
        for t in range(3):
            np.testing.assert_array_equal(obs["rgb"][0].numpy(), episode["rgb"][t])
            np.testing.assert_allclose(obs["tcp_pose"][0].numpy(), episode["tcp_pose"][t], atol=1e-6)
            obs = env.step(torch.as_tensor(episode["action"][t : t + 1]))[0]
    finally:
        env.close()


def test_action_norm_stats_on_a_hand_example():
    actions = np.zeros((101, 7), dtype=np.float32)
    actions[:, 0] = np.arange(101) / 100  # 0.00, 0.01, ..., 1.00
    actions[:, 6] = np.where(np.arange(101) < 50, -1.0, 1.0)
    stats = action_norm_stats([{"action": actions[:60]}, {"action": actions[60:]}])
    action = stats["action"]
    assert stats["num_transitions"] == 101 and stats["num_trajectories"] == 2
    assert action["mask"] == [True] * 6 + [False]
    np.testing.assert_allclose(action["q01"][0], 0.01, atol=1e-6)
    np.testing.assert_allclose(action["q99"][0], 0.99, atol=1e-6)
    np.testing.assert_allclose([action["min"][0], action["max"][0], action["mean"][0]], [0.0, 1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(action["std"][0], np.std(np.arange(101) / 100), atol=1e-6)
    assert action["q01"][6] == -1.0 and action["q99"][6] == 1.0 and action["std"][1] == 0.0
