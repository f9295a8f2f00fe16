"""PutOnPlateInScene25Main-v3 (common/envs/put_on_plate_25.py) through the real ManiSkill code path, on stand-in
assets of the real layout (tests/bridge_standin.py): native-resolution camera, per-episode instructions, success,
missing assets."""

import json
import os
import subprocess
import sys

import pytest
import torch

from common.envs.maniskill import ManiSkillVLAEnv, check_env_id, next_episode_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_ID = "PutOnPlateInScene25Main-v3"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bridge_standin

    folder = str(bridge_standin.build(tmp_path_factory.mktemp("ms_assets")))
    previous = os.environ.get("MS_ASSET_DIR")
    os.environ["MS_ASSET_DIR"] = folder
    yield folder
    if previous is None:
        os.environ.pop("MS_ASSET_DIR")
    else:
        os.environ["MS_ASSET_DIR"] = previous


@pytest.fixture(scope="module")
def env(assets):
    env = ManiSkillVLAEnv(ENV_ID, num_envs=1, max_episode_steps=2)
    yield env
    env.close()


def test_native_resolution_and_instruction_per_episode(env):
    obs = env.reset([0])
    assert obs["rgb"].shape == (1, 480, 640, 3) and obs["tcp_pose"].shape == (1, 7)  # the camera's own 640x480
    first = env.instructions[0]
    env.reset([1])
    assert env.instructions[0] != first and env.instructions[0].startswith("put ")  # seeds 0 and 1 draw other objects
    env.reset([0])
    assert env.instructions[0] == first


def test_auto_reset_rereads_the_instruction(env):
    env.reset([0])
    for _ in range(2):
        obs, _, terminated, truncated, info = env.step(torch.zeros(1, 7))
    assert info["reset_mask"].all() and obs["rgb"].shape == (1, 480, 640, 3)
    after_auto_reset = env.instructions[0]
    env.reset([next_episode_seed(0)])
    assert env.instructions[0] == after_auto_reset


def test_object_on_plate_is_success(assets):
    code = """
import json, numpy as np, torch, gymnasium as gym
import mani_skill.envs, common.envs.put_on_plate_25 as task
from mani_skill.utils.structs.pose import Pose
env = gym.make(task.ENV_ID, num_envs=1, obs_mode="rgb+segmentation", sim_backend="physx_cpu")
env.reset(seed=0)
u = env.unwrapped
_, _, _, _, before = env.step(np.zeros(7, dtype=np.float32))
plate = u.plates[u.episode["plate"][0]].pose.p
on_plate = Pose.create_from_pq(p=plate + torch.tensor([0, 0, 0.03]), q=torch.tensor([[1.0, 0, 0, 0]]))
u.objects[u.episode["obj"][0]].set_pose(on_plate)
for _ in range(3):
    _, _, _, _, after = env.step(np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32))
print(json.dumps({"before": bool(before["success"][0]), "after": bool(after["success"][0])}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "MS_ASSET_DIR": assets},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"before": False, "after": True}


def test_missing_assets_fail_before_any_worker_starts(tmp_path, assets):
    os.environ["MS_ASSET_DIR"] = str(tmp_path)
    try:
        with pytest.raises(FileNotFoundError, match="hf download --repo-type dataset RLinf/maniskill_assets"):
            check_env_id(ENV_ID)
    finally:
        os.environ["MS_ASSET_DIR"] = assets
