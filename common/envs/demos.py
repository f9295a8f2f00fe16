"""Demonstrations written by collect_demos.py: reading them back and the action statistics OpenVLA normalises with.

On-disk format, one folder per task:

    meta.json                 format ("npz"; "lerobot": a LeRobot v3.0 dataset beside it instead of the npz files),
                              env_id, control_mode, instruction, image_size, max_episode_steps, first_seed,
                              episodes_tried (seeds first_seed .. first_seed + episodes_tried - 1), num_episodes
                              (written), keep_failed, expert_success_rate, action_norm_stats (`action_norm_stats`)
    episode_000000.npz        one per episode (np.savez_compressed), T = number of actions taken:
        rgb          (T, H, W, 3) uint8    the first sensor camera, as ManiSkillVLAEnv gives it to the policy
        tcp_pose     (T, 7) float32        obs["extra"]["tcp_pose"]: TCP position xyz and quaternion wxyz
        action       (T, 7) float32        pd_ee_delta_pose action in [-1, 1] taken after seeing rgb[t], tcp_pose[t]
        instruction  () str                the task's instruction (common.envs.maniskill.INSTRUCTIONS)
        success      () bool               the env's success flag at the last step
        seed         () int64              the env reset seed that reproduces the episode

Episodes end at the first success (the env terminates there, as in the RL scripts) or at max_episode_steps.
"""

import glob
import json
import os

import numpy as np

from common.envs.lerobot_dataset import LeRobotEpisodes, is_lerobot_dataset

EPISODE_KEYS = ("rgb", "tcp_pose", "action", "instruction", "success", "seed")


def save_episode(path: str, episode: dict) -> None:
    np.savez_compressed(path, **{key: np.asarray(episode[key]) for key in EPISODE_KEYS})


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def load_demos(path: str) -> list[dict]:
    """All episodes under `path`, in file order: dicts of numpy arrays (0-d arrays unwrapped to Python scalars).
    A LeRobot dataset written by collect_demos.py --format lerobot reads back as the same dicts."""
    if is_lerobot_dataset(path):
        dataset, episodes = LeRobotEpisodes(path), []
        for i in range(len(dataset)):
            episode = dataset[i]
            episode["tcp_pose"] = episode.pop("state")
            episodes.append(episode)
        return episodes
    files = sorted(glob.glob(os.path.join(path, "episode_*.npz")))
    if not files:
        raise FileNotFoundError(f"no episode_*.npz under {path!r}: write some with collect_demos.py")
    episodes = []
    for file in files:
        with np.load(file) as data:
            episodes.append({key: data[key].item() if data[key].ndim == 0 else data[key] for key in data.files})
    return episodes


def action_norm_stats(episodes: list[dict]) -> dict:
    """OpenVLA's `norm_stats[key]` entry for these actions: per-dim statistics over all steps of all episodes.

    OpenVLA maps q01..q99 to [-1, 1] on the dims where `mask` is True and leaves the gripper (last dim) as is
    (prismatic-vlms `ActionTokenizer` / openvla `predict_action`; statistics as in its `dataset_statistics.json`).
    """
    actions = np.concatenate([np.asarray(e["action"], dtype=np.float64) for e in episodes])  # (N, 7)
    mask = [True] * (actions.shape[1] - 1) + [False]
    stats = {
        "mean": actions.mean(0),
        "std": actions.std(0),
        "max": actions.max(0),
        "min": actions.min(0),
        "q01": np.quantile(actions, 0.01, axis=0),
        "q99": np.quantile(actions, 0.99, axis=0),
    }
    action = {key: value.astype(np.float32).tolist() for key, value in stats.items()} | {"mask": mask}
    return {"action": action, "num_transitions": len(actions), "num_trajectories": len(episodes)}
