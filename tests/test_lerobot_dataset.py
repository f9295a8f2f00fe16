"""LeRobot v3.0 datasets: written here, read back through the reader the SFT scripts use."""

import json

import numpy as np
import pytest

from common.envs.lerobot_dataset import LeRobotEpisodes, LeRobotWriter


def episodes(lengths=(5, 9, 3)):
    """Frames that differ from each other (a brightness ramp plus a pattern), random states and actions."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :64]
    out, k = [], 0
    for i, T in enumerate(lengths):
        rgb = []
        for _ in range(T):
            rgb.append(np.stack([np.full_like(xx, 10 + 12 * k), xx * 2, yy * 3], -1).astype(np.uint8))
            k += 1
        out.append(
            {
                "rgb": np.stack(rgb),
                "state": rng.normal(size=(T, 7)).astype(np.float32),
                "action": rng.uniform(-1, 1, (T, 7)).astype(np.float32),
                "instruction": ["push the cube to the goal region", "pick up the cube"][i % 2],
                "success": i != 1,
                "seed": 100 + i,
            }
        )
    return out


def write(root, demos, video=False):
    writer = LeRobotWriter(str(root), fps=10, video=video)
    for demo in demos:
        writer.add_episode(demo)
    writer.close()


@pytest.mark.parametrize("video", [False, True])
def test_round_trip(tmp_path, video):
    demos = episodes()
    write(tmp_path / "ds", demos, video)
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == 17 and info["total_tasks"] == 2
    assert info["features"]["observation.images.image"]["dtype"] == ("video" if video else "image")
    dataset = LeRobotEpisodes(str(tmp_path / "ds"))
    assert len(dataset) == 3
    for demo, read in zip(demos, (dataset[i] for i in range(3))):
        assert read["instruction"] == demo["instruction"]
        assert (read["success"], read["seed"]) == (demo["success"], demo["seed"])
        np.testing.assert_array_equal(read["action"], demo["action"])
        np.testing.assert_array_equal(read["state"], demo["state"])
        assert read["rgb"].shape == demo["rgb"].shape and read["rgb"].dtype == np.uint8
        if video:  # lossy, but each frame is its own (the brightness ramp steps by 12 per frame)
            error = np.abs(read["rgb"][..., 0].astype(int) - demo["rgb"][..., 0]).mean(axis=(1, 2))
            assert error.max() < 3
        else:
            np.testing.assert_array_equal(read["rgb"], demo["rgb"])
    stats = json.loads((tmp_path / "ds" / "meta" / "stats.json").read_text())
    actions = np.concatenate([d["action"] for d in demos])
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-6)
    pixels = np.concatenate([d["rgb"] for d in demos]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(np.ravel(stats["observation.images.image"]["mean"]), pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(np.ravel(stats["observation.images.image"]["std"]), pixels.std(0), rtol=1e-6)


def test_bad_keys_and_versions_are_refused_clearly(tmp_path):
    write(tmp_path / "ds", episodes())
    with pytest.raises(ValueError, match=r"--dataset-image-key 'observation.images.wrist'.*observation.images.image"):
        LeRobotEpisodes(str(tmp_path / "ds"), image_key="observation.images.wrist")
    with pytest.raises(ValueError, match=r"--dataset-image-key 'action' is a float32, not an image"):
        LeRobotEpisodes(str(tmp_path / "ds"), image_key="action")
    with pytest.raises(FileExistsError, match="already holds a LeRobot dataset"):
        LeRobotWriter(str(tmp_path / "ds"), fps=10)
    info_file = tmp_path / "ds" / "meta" / "info.json"
    info_file.write_text(json.dumps(json.loads(info_file.read_text()) | {"codebase_version": "v2.1"}))
    with pytest.raises(ValueError, match="only 'v3.0' is read"):
        LeRobotEpisodes(str(tmp_path / "ds"))
