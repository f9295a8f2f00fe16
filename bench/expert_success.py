"""Success rate of the scripted experts (common/envs/experts.py) on the CPU simulator, state observations only.

    python bench/expert_success.py                                    # all experts, seeds 0..49
    python bench/expert_success.py --env-ids PickCube-v1 --num-seeds 100 --max-episode-steps 80

An episode succeeds when the env's `success` flag is set at any step within `--max-episode-steps` (default: the
task's registered limit). Reported per task: successes / seeds, mean and max steps to the first success, failed seeds.
"""

import argparse
import os
import sys
import time

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs.experts import EXPERTS  # noqa: E402


def run_episode(env, expert, seed: int, max_steps: int) -> int:
    """Steps until the first success, or 0 if the episode never succeeds."""
    env.reset(seed=seed)
    expert.reset()
    for step in range(1, max_steps + 1):
        _, _, _, _, info = env.step(expert.act(env.unwrapped))
        if bool(info["success"][0]):
            return step
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-ids", nargs="+", default=list(EXPERTS))
    parser.add_argument("--num-seeds", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--max-episode-steps", type=int, default=None)
    args = parser.parse_args()
    import mani_skill.envs  # noqa: F401

    for env_id in args.env_ids:
        env = gym.make(env_id, num_envs=1, sim_backend="physx_cpu", obs_mode="state", control_mode="pd_ee_delta_pose")
        max_steps = args.max_episode_steps or gym.spec(env_id).max_episode_steps
        expert, start = EXPERTS[env_id](), time.time()
        seeds = range(args.first_seed, args.first_seed + args.num_seeds)
        steps = {seed: run_episode(env, expert, seed, max_steps) for seed in seeds}
        env.close()
        wins = [s for s in steps.values() if s]
        print(
            f"{env_id}: {len(wins)}/{len(steps)} succeed within {max_steps} steps "
            f"(steps to success mean {np.mean(wins) if wins else float('nan'):.1f}, max {max(wins, default=0)}); "
            f"failed seeds {[seed for seed, s in steps.items() if not s]}; {time.time() - start:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
