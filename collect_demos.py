"""Demonstrations from the scripted experts (common/envs/experts.py), recorded as the VLA policies see the task.

What it does: for seeds seed, seed+1, ... it resets one ManiSkill3 env on the CPU sim, lets the task's scripted expert
act from the privileged simulator state in the `pd_ee_delta_pose` controller, and records per step the camera image
and TCP pose that ManiSkillVLAEnv gives the RL scripts (same env construction and observation wrapper, same image
size), the instruction and the expert's action. Episodes that succeed are written until `--num-episodes` are on disk
(`--keep-failed` writes every episode). The format is documented in common/envs/demos.py; `load_demos` reads it back and
`action_norm_stats` gives the statistics OpenVLA normalises actions with (also stored in meta.json). `--format lerobot`
writes the same episodes as a LeRobot v3.0 dataset (common/envs/lerobot_dataset.py: images as lossless PNG, or an
H.264 video with `--video`; state = the TCP pose; fps = the controller's frequency), with meta.json beside it.

`--from-trajectory` imports ManiSkill's own demonstrations instead (a `trajectory.h5` + `.json` pair, as ManiSkill's
`RecordEpisode` and its demo downloads store them, replayed into the camera observations and the `pd_ee_delta_pose`
controller first: common/envs/maniskill_h5.py), and `--from-lerobot` a LeRobot v3.0 dataset of a ManiSkill task (a
folder or a hub id), into the same folder layout and meta.json, so the SFT scripts take them with --demos as they
take the experts' demos.

Run:
    python collect_demos.py --env-id PickCube-v1 --num-episodes 100
    python collect_demos.py --env-id StackCube-v1 --num-episodes 50 --image-size 256 --out-dir demos/stack
    python collect_demos.py --env-id PushCube-v1 --format lerobot --out-dir demos/PushCube-v1-lerobot
    python -m mani_skill.utils.download_demo PickCube-v1
    python -m mani_skill.trajectory.replay_trajectory \
        --traj-path ~/.maniskill/demos/PickCube-v1/motionplanning/trajectory.h5 \
        --use-first-env-state -o rgb -c pd_ee_delta_pose --save-traj
    python collect_demos.py --from-trajectory \
        ~/.maniskill/demos/PickCube-v1/motionplanning/trajectory.rgb.pd_ee_delta_pose.physx_cpu.h5
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import tyro

from common.envs.demos import action_norm_stats, save_episode
from common.envs.experts import EXPERTS
from common.envs.lerobot_dataset import (
    ACTION_KEY,
    IMAGE_KEY,
    STATE_KEY,
    LeRobotEpisodes,
    LeRobotWriter,
    resolve_dataset,
)
from common.envs.maniskill import INSTRUCTIONS, check_env_id, check_render_device, make_cpu_env
from common.envs.maniskill_h5 import load_trajectories, read_trajectory_meta

CONTROL_MODE = "pd_ee_delta_pose"  # the experts' action space
TCP_POSE_NAMES = ["x", "y", "z", "qw", "qx", "qy", "qz"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]  # pd_ee_delta_pose; gripper -1 close, +1 open


@dataclass
class Args:
    env_id: Optional[str] = None
    """ManiSkill3 task with a scripted expert (PushCube-v1, PullCube-v1, PickCube-v1, StackCube-v1; default
    PickCube-v1), or with --from-lerobot the task the data is of"""
    num_episodes: int = 100
    """episodes to write"""
    seed: int = 0
    """env reset seed of the first episode; episode i is tried with seed + i"""
    out_dir: Optional[str] = None
    """output folder (default demos/{env_id})"""
    image_size: int = 224
    """camera image height and width, as --image-size of the RL scripts"""
    max_episode_steps: Optional[int] = None
    """episode length limit (default: the task's registered one)"""
    keep_failed: bool = False
    """also write episodes in which the expert failed"""
    max_attempts: Optional[int] = None
    """give up after this many episodes (default 2 * num_episodes + 10)"""
    format: Literal["npz", "lerobot"] = "npz"
    """npz: one episode_*.npz per episode (common/envs/demos.py); lerobot: a LeRobot v3.0 dataset"""
    video: bool = False
    """with --format lerobot: store the camera as an H.264 mp4 (lossy) instead of PNG frames"""
    from_trajectory: Optional[str] = None
    """import the episodes of this ManiSkill trajectory.h5 (replayed with -o rgb -c pd_ee_delta_pose) instead of
    running the experts; --env-id, --image-size and --max-episode-steps then come from the file"""
    from_lerobot: Optional[str] = None
    """import the episodes of this LeRobot v3.0 dataset of --env-id (a folder or a hub id; pd_ee_delta_pose actions,
    TCP-pose state) instead of running the experts"""
    dataset_image_key: str = IMAGE_KEY
    """with --from-lerobot: the camera feature"""
    dataset_state_key: str = STATE_KEY
    """with --from-lerobot: the TCP pose feature (xyz + quaternion wxyz)"""
    dataset_action_key: str = ACTION_KEY
    """with --from-lerobot: the action feature"""
    instruction: Optional[str] = None
    """with --from-trajectory / --from-lerobot: the language instruction (default: the task's built-in one / the
    dataset's task)"""


def make_env(env_id: str, image_size: int, max_episode_steps: Optional[int]):
    """One CPU env built exactly as ManiSkillVLAEnv builds each of its workers: obs {"rgb", "tcp_pose"} in numpy."""
    make_kwargs = dict(
        obs_mode="rgb",
        control_mode=CONTROL_MODE,
        reward_mode="sparse",
        render_mode="rgb_array",
        sensor_configs=dict(width=image_size, height=image_size),
    )
    if max_episode_steps:
        make_kwargs["max_episode_steps"] = max_episode_steps
    return make_cpu_env(env_id, make_kwargs)


def record_episode(env, expert, seed: int, instruction: str) -> dict:
    """Run the expert from the reset with `seed` until the env terminates (success) or truncates."""
    obs, _ = env.reset(seed=seed)
    expert.reset()
    rgb, tcp_pose, actions = [], [], []
    done, success = False, False
    while not done:
        action = expert.act(env.unwrapped)
        rgb.append(obs["rgb"])
        tcp_pose.append(obs["tcp_pose"])
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        done, success = bool(terminated or truncated), bool(info["success"])
    return dict(
        rgb=np.stack(rgb).astype(np.uint8),  # (T, H, W, 3)
        tcp_pose=np.stack(tcp_pose).astype(np.float32),  # (T, 7)
        action=np.stack(actions).astype(np.float32),  # (T, 7)
        instruction=instruction,
        success=success,
        seed=seed,
    )


def open_lerobot(out_dir: str, args: Args, fps: int) -> Optional[LeRobotWriter]:
    if args.format != "lerobot":
        return None
    names = dict(state_names=TCP_POSE_NAMES, action_names=ACTION_NAMES)
    return LeRobotWriter(out_dir, fps, args.video, "panda", **names)


def write_episode(out_dir: str, lerobot: Optional[LeRobotWriter], index: int, episode: dict) -> None:
    if lerobot is None:
        save_episode(os.path.join(out_dir, f"episode_{index:06d}.npz"), episode)
    else:
        lerobot.add_episode(episode | {"state": episode["tcp_pose"]})


def write_meta(out_dir: str, meta: dict) -> None:
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def import_trajectory(args: Args) -> None:
    """--from-trajectory: a ManiSkill trajectory file's episodes into --out-dir."""
    info = read_trajectory_meta(args.from_trajectory)["env_info"]
    env_id = info["env_id"]
    check_env_id(env_id)
    instruction = args.instruction or INSTRUCTIONS.get(env_id)
    if instruction is None:
        raise ValueError(f"{env_id} has no built-in instruction: pass --instruction 'what to do'")
    episodes = load_trajectories(args.from_trajectory, instruction, control_mode=CONTROL_MODE)
    sim_config = info.get("env_kwargs", {}).get("sim_config") or {}
    fps = sim_config.get("control_freq", 20)  # 20: ManiSkill's SimConfig default
    write_imported(args, env_id, episodes, fps, info.get("max_episode_steps"), args.from_trajectory)


def import_lerobot(args: Args) -> None:
    """--from-lerobot: a LeRobot dataset of a ManiSkill task (--env-id; pd_ee_delta_pose actions, TCP-pose state)
    into --out-dir."""
    if args.env_id is None:
        raise ValueError("--from-lerobot needs --env-id: the ManiSkill task the data is of (evaluation runs there)")
    check_env_id(args.env_id)
    root = resolve_dataset(args.from_lerobot, "--from-lerobot")
    keys = (args.dataset_image_key, args.dataset_state_key, args.dataset_action_key)
    dataset = LeRobotEpisodes(root, *keys)
    for name, key in (("state", args.dataset_state_key), ("action", args.dataset_action_key)):
        if dataset.info["features"][key]["shape"] != [7]:
            raise ValueError(
                f"--dataset-{name}-key {key!r} has shape {dataset.info['features'][key]['shape']}; the demos need 7 "
                f"dims ({'TCP xyz + quaternion wxyz' if name == 'state' else 'pd_ee_delta_pose'})"
            )
    episodes = []
    for i in range(len(dataset)):
        episode = dataset[i]
        episode["tcp_pose"] = episode.pop("state")
        episode["instruction"] = args.instruction or episode["instruction"]
        episodes.append(episode)
    write_imported(args, args.env_id, episodes, round(dataset.fps), None, args.from_lerobot)


def write_imported(args: Args, env_id: str, episodes: list[dict], fps: int, max_steps: Optional[int], source: str):
    """Imported episodes (successes only, unless --keep-failed) as a demo folder with its meta.json."""
    height, width = episodes[0]["rgb"].shape[1:3]
    if height != width:
        raise ValueError(f"{source!r}: {height} x {width} camera; the VLA envs render square images")
    out_dir = args.out_dir or os.path.join("demos", env_id)
    os.makedirs(out_dir, exist_ok=True)
    lerobot = open_lerobot(out_dir, args, fps)
    kept = [e for e in episodes if e["success"] or args.keep_failed]
    for index, episode in enumerate(kept):
        write_episode(out_dir, lerobot, index, episode)
    if lerobot is not None:
        lerobot.close()
    meta = dict(
        format=args.format,
        env_id=env_id,
        control_mode=CONTROL_MODE,
        instruction=kept[0]["instruction"],
        image_size=int(height),
        max_episode_steps=max_steps or gym.spec(env_id).max_episode_steps,
        first_seed=min(e["seed"] for e in episodes),
        episodes_tried=len(episodes),
        num_episodes=len(kept),
        keep_failed=args.keep_failed,
        expert_success_rate=sum(e["success"] for e in episodes) / len(episodes),
        action_norm_stats=action_norm_stats(kept),
        source=os.path.abspath(source) if os.path.exists(source) else source,  # a file or folder, or a hub id
    )
    write_meta(out_dir, meta)
    print(f"wrote {len(kept)} of the {len(episodes)} episodes of {source} to {out_dir}")


def main(args: Args) -> None:
    if args.video and args.format != "lerobot":
        raise ValueError("--video stores a LeRobot dataset's camera as mp4: it needs --format lerobot")
    if args.from_trajectory and args.from_lerobot:
        raise ValueError("--from-trajectory and --from-lerobot: import one source at a time")
    if args.from_trajectory:
        return import_trajectory(args)
    if args.from_lerobot:
        return import_lerobot(args)
    args.env_id = args.env_id or "PickCube-v1"
    check_env_id(args.env_id)
    if args.env_id not in EXPERTS:
        raise ValueError(f"--env-id {args.env_id}: scripted experts exist for {', '.join(EXPERTS)}")
    check_render_device()
    out_dir = args.out_dir or os.path.join("demos", args.env_id)
    os.makedirs(out_dir, exist_ok=True)
    max_attempts = args.max_attempts or 2 * args.num_episodes + 10

    env = make_env(args.env_id, args.image_size, args.max_episode_steps)
    instruction = env.instruction() or INSTRUCTIONS[args.env_id]
    expert = EXPERTS[args.env_id]()
    lerobot = open_lerobot(out_dir, args, env.unwrapped.control_freq)
    kept, successes, tried, start = [], 0, 0, time.time()
    while len(kept) < args.num_episodes and tried < max_attempts:
        episode = record_episode(env, expert, args.seed + tried, instruction)
        tried += 1
        successes += episode["success"]
        if episode["success"] or args.keep_failed:
            write_episode(out_dir, lerobot, len(kept), episode)
            kept.append({"action": episode["action"]})
        print(f"seed {episode['seed']}: success={episode['success']} steps={len(episode['action'])} kept={len(kept)}")
    env.close()
    if len(kept) < args.num_episodes:
        raise RuntimeError(f"only {len(kept)} of --num-episodes {args.num_episodes} in {tried} tries (--max-attempts)")
    if lerobot is not None:
        lerobot.close()

    meta = dict(
        format=args.format,
        env_id=args.env_id,
        control_mode=CONTROL_MODE,
        instruction=instruction,
        image_size=args.image_size,
        max_episode_steps=args.max_episode_steps or gym.spec(args.env_id).max_episode_steps,
        first_seed=args.seed,
        episodes_tried=tried,
        num_episodes=len(kept),
        keep_failed=args.keep_failed,
        expert_success_rate=successes / tried,
        action_norm_stats=action_norm_stats(kept),
    )
    write_meta(out_dir, meta)
    seconds = time.time() - start
    print(f"wrote {len(kept)} episodes to {out_dir} ({successes}/{tried} expert successes, {seconds:.0f} s)")


if __name__ == "__main__":
    main(tyro.cli(Args))
