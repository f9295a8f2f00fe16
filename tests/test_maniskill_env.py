"""The ManiSkill3 wrapper on the real simulator (CPU physics, software rendering)."""

import os
import subprocess
import sys

import pytest
import torch

from common.envs.maniskill import ManiSkillVLAEnv, check_env_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env():
    env = ManiSkillVLAEnv("PickCube-v1", num_envs=2, image_size=64, max_episode_steps=3)
    yield env
    env.close()


def test_reset_is_seeded_per_env(env):
    obs = env.reset([7, 7])
    assert obs["rgb"].shape == (2, 64, 64, 3) and obs["rgb"].dtype == torch.uint8
    assert obs["tcp_pose"].shape == (2, 7)
    assert torch.equal(obs["rgb"][0], obs["rgb"][1])  # same seed, same initial state (GRPO groups rely on it)
    again = env.reset([7, 8])
    assert torch.equal(again["rgb"][0], obs["rgb"][0]) and not torch.equal(again["rgb"][0], again["rgb"][1])
    assert env.instructions == ["pick up the cube and move it to the goal position"] * 2


def test_truncation_auto_resets_and_keeps_final_obs(env):
    env.reset([1, 2])
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(torch.zeros(2, 7))
        assert reward.shape == (2,) and info["success"].shape == (2,) and info["success_once"].shape == (2,)
        assert torch.equal(info["reset_mask"], terminated | truncated)
    assert truncated.all() and not terminated.any() and info["reset_mask"].all()  # max_episode_steps=3
    assert not torch.equal(info["final_obs"]["rgb"], obs["rgb"])  # obs is already the next episode's first frame


def test_killed_worker_is_respawned_and_replays_the_episode(env):
    env.max_worker_restarts = 2
    actions = [torch.rand(2, 7) * 2 - 1 for _ in range(2)]

    def rollout(kill_after: int):
        env.reset([5, 6])
        frames = []
        for t, action in enumerate(actions):
            if t == kill_after:
                env.env.processes[0].kill()
                env.env.processes[0].join()
            frames.append(env.step(action)[0]["rgb"])
        return torch.stack(frames)

    reference = rollout(kill_after=-1)
    restarts = env.worker_restarts
    assert torch.equal(rollout(kill_after=1), reference)  # ManiSkill's CPU physics replays exactly
    assert env.worker_restarts == restarts + 1


def test_eval_mode_runs_to_the_time_limit(env):
    env.ignore_terminations = True  # eval protocol: terminated never ends an episode, success_once is reported
    try:
        env.reset([3, 4])
        for _ in range(3):
            _, _, terminated, truncated, info = env.step(torch.zeros(2, 7))
            assert not terminated.any() and torch.equal(info["reset_mask"], truncated)
            assert torch.equal(info["success_once"], info["success_once"] | info["success"])
        assert truncated.all()
    finally:
        env.ignore_terminations = False


def test_retries_exhausted_name_the_task(env):
    env.max_worker_restarts = 0
    env.reset([1, 2])
    env.env.processes[1].kill()
    with pytest.raises(RuntimeError, match="PickCube-v1"):
        env.step(torch.zeros(2, 7))


def test_unknown_env_id_lists_the_valid_ones():
    with pytest.raises(ValueError, match="PushCube-v1"):
        check_env_id("PushKube-v1")


def test_gripperless_task_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="no gripper"):
        check_env_id("PushT-v1")


def test_missing_render_device_says_how_to_install_one():
    code = "from common.envs.maniskill import check_render_device; check_render_device()"
    env = {**os.environ, "VK_ICD_FILENAMES": "/nonexistent.json", "VK_DRIVER_FILES": "/nonexistent.json"}  # no Vulkan
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode != 0 and "scripts/setup.sh" in out.stderr, out.stderr[-2000:]
