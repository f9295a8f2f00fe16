"""LIBERO env throughput: env steps/s with and without subprocess workers (common/envs/libero.py).

    python bench/bench_libero_env.py                                  # 2 envs, 64 steps each, 256 px camera
    python bench/bench_libero_env.py --num-envs 1 2 4 --steps 128 --camera-size 256

Each configuration builds its envs, resets them (task 0, init states 0..N-1, 10 settle steps) and then executes
`--steps` random actions per env in chunks of 8, as the SRPO rollout does (the policy is not run). Reported: the
reset time and env steps/s over all envs for three kinds of video: only the frames the policy sees (one per chunk,
"policy"); those plus the 64 frames V-JEPA 2 samples for the progress reward, rendered at the episode's end from
the poses they show ("+vjepa64", what SRPO does); and every frame of the episode ("all", what the progress reward
rendered before it deferred frames). The simulation of different envs overlaps only with workers.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs.libero import LiberoVectorEnv, configure_rendering, to_libero_actions  # noqa: E402
from common.models.vjepa2 import subsample_frame_indices  # noqa: E402

VIDEOS = ("policy", "+vjepa64", "all")


def bench(
    suite: str, num_envs: int, use_workers: bool, steps: int, camera_size: int, video: str
) -> tuple[float, float]:
    envs = LiberoVectorEnv(suite, num_envs, camera_size=camera_size, max_steps=steps, use_workers=use_workers)
    try:
        t = time.time()
        envs.reset([0] * num_envs, list(range(num_envs)), record_frames=video != "policy")
        reset_s = time.time() - t
        rng = np.random.default_rng(0)
        t = time.time()
        executed = 0
        for _ in range(steps // 8):
            chunk = np.concatenate([rng.uniform(-0.3, 0.3, (num_envs, 8, 6)), rng.uniform(0, 1, (num_envs, 8, 1))], -1)
            executed += int(envs.step(to_libero_actions(chunk))[3].sum())
        if video == "+vjepa64":
            envs.videos([subsample_frame_indices(steps + 1, 64)] * num_envs)
        elif video == "all":
            envs.videos()
        return reset_s, executed / (time.time() - t)
    finally:
        envs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=64, help="env steps per env (a multiple of 8)")
    parser.add_argument("--camera-size", type=int, default=256)
    args = parser.parse_args()
    print(
        f"MUJOCO_GL={configure_rendering()}, {os.cpu_count()} CPU cores, suite {args.suite}, "
        f"camera {args.camera_size} px"
    )
    print(f"{'envs':>4} {'mode':>10} {'frames':>9} {'reset s':>8} {'steps/s':>8}")
    for num_envs in args.num_envs:
        for use_workers in (False, True):
            for video in VIDEOS:
                reset_s, steps_per_s = bench(args.suite, num_envs, use_workers, args.steps, args.camera_size, video)
                mode = "workers" if use_workers else "in-process"
                print(f"{num_envs:>4} {mode:>10} {video:>9} {reset_s:>8.1f} {steps_per_s:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
