"""ManiSkill's own trajectory files (`trajectory.h5` + `trajectory.json`, as `RecordEpisode` and the ManiSkill demo
downloads store them) read as the episodes of common/envs/demos.py.

The demos ManiSkill ships record env states and actions in the controller they were made with; replay them into the
observations and controller the VLA scripts use first:

    python -m mani_skill.utils.download_demo PickCube-v1
    python -m mani_skill.trajectory.replay_trajectory \\
        --traj-path ~/.maniskill/demos/PickCube-v1/motionplanning/trajectory.h5 \\
        --use-first-env-state -o rgb -c pd_ee_delta_pose --save-traj   # writes trajectory.rgb.pd_ee_delta_pose.*.h5

In each trajectory group `traj_{i}`: actions (T, 7); obs/sensor_data/{camera}/rgb and obs/extra/tcp_pose hold T + 1
entries (the last observation after the last action, dropped here); the json's `episodes[i]` has episode_seed,
control_mode and success; `env_info` the env id and its make kwargs.
"""

import json
import os
from typing import Optional

import numpy as np

REPLAY_HINT = (
    "replay it with `python -m mani_skill.trajectory.replay_trajectory --traj-path {} --use-first-env-state "
    "-o rgb -c pd_ee_delta_pose --save-traj`"
)


def read_trajectory_meta(h5_path: str) -> dict:
    json_path = os.path.splitext(h5_path)[0] + ".json"
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"{h5_path!r} has no {os.path.basename(json_path)} beside it (ManiSkill writes both)")
    with open(json_path) as f:
        return json.load(f)


def load_trajectories(
    h5_path: str, instruction: str, camera: Optional[str] = None, control_mode: str = "pd_ee_delta_pose"
) -> list[dict]:
    """Every episode of a ManiSkill trajectory file as a demos.py episode (rgb, tcp_pose, action, instruction,
    success, seed). camera None: the first one recorded (ManiSkillVLAEnv shows the first sensor camera)."""
    import h5py

    meta = read_trajectory_meta(h5_path)
    episodes = []
    with h5py.File(h5_path, "r") as f:
        for info in meta["episodes"]:
            if info["control_mode"] != control_mode:
                raise ValueError(
                    f"{h5_path!r}: episode {info['episode_id']} is in {info['control_mode']!r}, the policies act in "
                    f"{control_mode!r}; " + REPLAY_HINT.format(h5_path)
                )
            group = f[f"traj_{info['episode_id']}"]
            sensors = group["obs"].get("sensor_data") if "obs" in group else None
            if sensors is None or not any("rgb" in sensors[name] for name in sensors):
                raise ValueError(f"{h5_path!r} holds no camera images; " + REPLAY_HINT.format(h5_path))
            name = camera or next(iter(sensors))
            if name not in sensors:
                raise ValueError(f"camera {name!r} is not in {h5_path!r}; it has {sorted(sensors)}")
            episodes.append(
                {
                    "rgb": np.asarray(sensors[name]["rgb"][:-1], dtype=np.uint8),
                    "tcp_pose": np.asarray(group["obs"]["extra"]["tcp_pose"][:-1], dtype=np.float32),
                    "action": np.asarray(group["actions"], dtype=np.float32),
                    "instruction": instruction,
                    "success": bool(info.get("success", True)),
                    "seed": int(info.get("episode_seed", info["reset_kwargs"].get("seed", -1))),
                }
            )
    return episodes
