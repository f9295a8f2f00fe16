"""How closely common/envs/libero_image.py reproduces the TensorFlow image pipeline of the OpenVLA-OFT LIBERO
evaluation.

Not part of the test suite: it needs TensorFlow, which the project does not depend on. Two steps:

    # 1. render raw agentview frames through the project's env (the project's Python)
    python bench/check_libero_image_vs_tf.py --render /tmp/libero_frames
    # 2. compare, in a separate virtual environment that has TensorFlow
    python3 -m venv /tmp/tfref && /tmp/tfref/bin/pip install tensorflow-cpu numpy pillow
    /tmp/tfref/bin/python bench/check_libero_image_vs_tf.py --compare /tmp/libero_frames

The reference is SimpleVLA-RL's `resize_image` / `center_crop_image` (the same calls as openvla-oft's
`experiments/robot`): encode_jpeg + decode_image, resize lanczos3 antialias, crop_and_resize of the central 0.9 area.
Each stage is compared on the same input (TensorFlow's output of the stage before), then the whole pipeline;
reported are the largest and the mean absolute difference in grey levels over all pixels and channels.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs import libero_image  # noqa: E402  (numpy only: importable in the TensorFlow venv)

EPISODES = [
    ("libero_spatial", 0),
    ("libero_spatial", 5),
    ("libero_object", 1),
    ("libero_object", 7),
    ("libero_goal", 2),
    ("libero_goal", 8),
    ("libero_10", 0),
    ("libero_10", 6),
]


def render(out_dir: str) -> None:
    """Two raw 256x256 agentview frames per episode: after the settle steps and after one random chunk."""
    from common.envs.libero import LiberoEnv, configure_rendering, to_libero_actions

    configure_rendering()
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for suite, task_id in EPISODES:
        env = LiberoEnv(suite, camera_size=256)
        env.reset(task_id, int(rng.integers(50)))
        np.save(os.path.join(out_dir, f"{suite}_{task_id}_reset.npy"), env.raw_frame)
        chunk = np.concatenate([rng.uniform(-0.8, 0.8, (8, 6)), rng.uniform(0, 1, (8, 1))], -1)
        env.step_chunk(to_libero_actions(chunk))
        np.save(os.path.join(out_dir, f"{suite}_{task_id}_chunk.npy"), env.raw_frame)
        env.close()


def tf_stages(raw: np.ndarray) -> dict:
    import tensorflow as tf

    flipped = raw[::-1, ::-1]
    decoded = tf.io.decode_image(tf.image.encode_jpeg(flipped), expand_animations=False, dtype=tf.uint8)
    resized = tf.image.resize(decoded, (224, 224), method="lanczos3", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    image = tf.image.convert_image_dtype(resized, tf.float32)[None]
    side = tf.clip_by_value(tf.sqrt(0.9), 0, 1)
    offset = (1 - side) / 2
    boxes = tf.reshape(tf.stack([offset, offset, offset + side, offset + side]), (1, 4))
    crop = tf.image.crop_and_resize(image, boxes, tf.range(1), (224, 224))[0]
    crop = tf.image.convert_image_dtype(tf.clip_by_value(crop, 0, 1), tf.uint8, saturate=True)
    return {"jpeg": decoded.numpy(), "resize": resized.numpy(), "crop": crop.numpy()}


def compare(frames_dir: str) -> None:
    paths = sorted(glob.glob(os.path.join(frames_dir, "*.npy")))
    if not paths:
        sys.exit(f"No .npy frames in {frames_dir}; make them with --render")
    diffs = {"jpeg": [], "resize": [], "crop": [], "full": []}
    for path in paths:
        raw = np.load(path)
        ref = tf_stages(raw)
        ours = {
            "jpeg": libero_image.jpeg_round_trip(np.ascontiguousarray(raw[::-1, ::-1])),
            "resize": libero_image.resize_lanczos3(ref["jpeg"], 224),
            "crop": libero_image.crop_center(ref["resize"]),
            "full": libero_image.model_image(raw),
        }
        ref["full"] = ref["crop"]
        for stage, image in ours.items():
            diffs[stage].append(np.abs(image.astype(np.int32) - ref[stage].astype(np.int32)))
    print(f"{len(paths)} frames ({raw.shape[0]}x{raw.shape[1]} agentview -> 224x224)")
    print(f"{'stage':>7} {'max':>4} {'mean':>9} {'pixels off':>11}")
    for stage, d in diffs.items():
        d = np.stack(d)
        print(f"{stage:>7} {d.max():>4} {d.mean():>9.5f} {np.mean(d > 0):>10.4%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--render", metavar="DIR", help="save raw agentview frames of a few LIBERO episodes")
    mode.add_argument("--compare", metavar="DIR", help="compare with TensorFlow on the frames in DIR")
    args = parser.parse_args()
    if args.render:
        render(args.render)
        return
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        sys.exit("TensorFlow is not importable here; see this script's docstring for the virtual environment.")
    compare(args.compare)


if __name__ == "__main__":
    main()
