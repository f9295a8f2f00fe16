"""The 13 out-of-distribution variants of PutOnPlateInScene25Main-v3 (common/envs/put_on_plate_25_ood.py) through the
real ManiSkill code path, on stand-in assets of the real layout (tests/bridge_standin.py).

mani-skill reads its asset folder once, at import, so the simulator part runs in one subprocess (this file run as a
script) that builds each env once, with obj_set "test" (the Main task with "train"), and reports what the tests check:
the draw of two seeds, one step, and episode 0 in detail. Episode 0 is the Main task's episode 0 (first object, first
plate, first photo, first placement) in the Vision variants, so their frames can be compared pixel by pixel."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = "PutOnPlateInScene25Main-v3"
OOD_IDS = [
    "PutOnPlateInScene25VisionImage-v1",
    "PutOnPlateInScene25VisionTexture03-v1",
    "PutOnPlateInScene25VisionTexture05-v1",
    "PutOnPlateInScene25VisionWhole03-v1",
    "PutOnPlateInScene25VisionWhole05-v1",
    "PutOnPlateInScene25Carrot-v1",
    "PutOnPlateInScene25Plate-v1",
    "PutOnPlateInScene25Instruct-v1",
    "PutOnPlateInScene25MultiCarrot-v1",
    "PutOnPlateInScene25MultiPlate-v1",
    "PutOnPlateInScene25Position-v1",
    "PutOnPlateInScene25EEPose-v1",
    "PutOnPlateInScene25PositionChangeTo-v1",
]
CAMERA = "3rd_view_camera"


def probe(out_dir: str) -> None:
    """Build every env once and write results.json (per env id) and frames.npz (episode 0's image per env id, and the
    Main task's robot-and-objects mask) to out_dir."""
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401
    import torch

    import common.envs.put_on_plate_25  # noqa: F401
    import common.envs.put_on_plate_25_ood  # noqa: F401

    results, frames = {}, {}
    zero_action = np.zeros(7, dtype=np.float32)
    for env_id in [MAIN, *OOD_IDS]:
        obj_set = "train" if env_id == MAIN else "test"
        env = gym.make(env_id, num_envs=1, obs_mode="rgb+segmentation", sim_backend="physx_cpu", obj_set=obj_set)
        u = env.unwrapped
        drawn = lambda: {k: v[0].item() for k, v in u.episode.items()}  # noqa: E731
        report = {"seeds": []}
        for seed in (0, 1):
            env.reset(seed=seed)
            report["seeds"].append({**drawn(), "instruction": u.get_language_instruction()[0]})
        obs, _, _, _, info = env.step(zero_action)
        rgb = obs["sensor_data"][CAMERA]["rgb"]
        report["step"] = dict(shape=list(rgb.shape), dtype=str(rgb.dtype), success=bool(info["success"][0]))

        obs, _ = env.reset(seed=0, options={"episode_id": torch.tensor([0])})
        camera = obs["sensor_data"][CAMERA]
        segmentation = camera["segmentation"][0, ..., 0]
        names = {int(a.per_scene_id[0]): a.name for a in u.objects + u.plates}
        obj = u.objects[u.episode["obj"][0]]
        report["episode0"] = {
            **drawn(),
            "instruction": u.get_language_instruction()[0],
            "in_view": sorted(names[i] for i in segmentation.unique().tolist() if i in names),
            "object_p": obj.pose.p[0].tolist(),
            "qpos": u.agent.robot.get_qpos()[0].tolist(),
            "ee_p": u.agent.robot.links_map["ee_gripper_link"].pose.p[0].tolist(),
            "placements": u.xyz_configs[u.episode["pos"][0].item()].tolist(),
        }
        frames[env_id] = camera["rgb"][0].numpy()
        if env_id == MAIN:
            frames["main_foreground"] = torch.isin(segmentation, u.foreground_ids).numpy()
        if env_id == "PutOnPlateInScene25PositionChangeTo-v1":
            report["object_p_per_step"] = []
            for _ in range(6):
                env.step(zero_action)
                report["object_p_per_step"].append(obj.pose.p[0].tolist())
        results[env_id] = report
        env.close()
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)
    np.savez_compressed(os.path.join(out_dir, "frames.npz"), **frames)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bridge_standin

    return str(bridge_standin.build(tmp_path_factory.mktemp("ms_assets")))


@pytest.fixture(scope="module")
def probed(assets, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("probe")
    run = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "MS_ASSET_DIR": assets},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out_dir / "results.json") as f:
        results = json.load(f)
    return results, dict(np.load(out_dir / "frames.npz"))


@pytest.mark.parametrize("env_id", OOD_IDS)
def test_every_variant_resets_steps_and_renders(probed, env_id):
    report = probed[0][env_id]
    assert report["step"]["shape"] == [1, 480, 640, 3] and report["step"]["dtype"] == "torch.uint8"
    first, second = report["seeds"]
    assert first["instruction"] and second["instruction"]
    assert first["id"] != second["id"]  # two seeds, two episodes


def test_vision_image_draws_unseen_photos(probed):
    results, frames = probed
    report = results["PutOnPlateInScene25VisionImage-v1"]
    assert all(16 <= d["table"] <= 20 for d in [*report["seeds"], report["episode0"]])
    assert all(d["obj"] < 16 for d in report["seeds"])  # the training objects
    background = ~frames["main_foreground"]
    assert (frames["PutOnPlateInScene25VisionImage-v1"][background] != frames[MAIN][background]).any()


def _mean_abs_diff(a, b, where):
    return np.abs(a.astype(np.float32) - b.astype(np.float32))[where].mean()


def test_texture_blends_robot_and_objects_only(probed):
    results, frames = probed
    foreground = frames["main_foreground"]
    assert foreground.any() and (~foreground).any()
    diffs = []
    for env_id in ("PutOnPlateInScene25VisionTexture03-v1", "PutOnPlateInScene25VisionTexture05-v1"):
        assert results[env_id]["episode0"]["table"] == results[MAIN]["episode0"]["table"] == 0  # the same scene
        assert np.array_equal(frames[env_id][~foreground], frames[MAIN][~foreground])  # the photo untouched
        diffs.append(_mean_abs_diff(frames[env_id], frames[MAIN], foreground))
    assert 1.0 < diffs[0] < diffs[1]  # 0.5 x mix blends more than 0.3 x mix


def test_whole_blends_the_whole_frame(probed):
    results, frames = probed
    background = ~frames["main_foreground"]
    diffs = []
    for env_id in ("PutOnPlateInScene25VisionWhole03-v1", "PutOnPlateInScene25VisionWhole05-v1"):
        assert results[env_id]["episode0"]["table"] == 0
        diffs.append(_mean_abs_diff(frames[env_id], frames[MAIN], background))
    assert 1.0 < diffs[0] < diffs[1]


def test_carrot_and_plate_draw_outside_the_main_sets(probed):
    results = probed[0]
    carrot, plate = results["PutOnPlateInScene25Carrot-v1"], results["PutOnPlateInScene25Plate-v1"]
    assert all(d["obj"] >= 16 for d in [*carrot["seeds"], carrot["episode0"]])  # Main (train): objects 0-15
    assert all(d["plate"] >= 1 for d in [*plate["seeds"], plate["episode0"]])  # Main: plate 0 only
    drawn_plate = f"plate_{plate['episode0']['plate']}"
    assert drawn_plate in plate["episode0"]["in_view"] and "plate_0" not in plate["episode0"]["in_view"]
    assert "dish" in plate["episode0"]["instruction"]


def test_instruct_rephrases_the_main_instruction(probed):
    results = probed[0]
    main, instruct = results[MAIN]["episode0"], results["PutOnPlateInScene25Instruct-v1"]["episode0"]
    assert main["instruction"] == "put red block 0 on plate"  # the same object and plate in both
    assert instruct["instruction"] == "Place the red block 0 on the plate"  # template 1
    assert all(1 <= d["template"] <= 16 for d in results["PutOnPlateInScene25Instruct-v1"]["seeds"])


def test_multi_carrot_and_multi_plate_put_two_in_view(probed):
    results = probed[0]
    multi_carrot = results["PutOnPlateInScene25MultiCarrot-v1"]["episode0"]
    objects_in_view = [n for n in multi_carrot["in_view"] if n.startswith("object_")]
    assert objects_in_view == sorted([f"object_{multi_carrot['obj']:02d}", f"object_{multi_carrot['extra']:02d}"])
    placements = np.asarray(multi_carrot["placements"])
    assert np.linalg.norm(placements[0, :2] - placements[2, :2]) > 0.15
    multi_plate = results["PutOnPlateInScene25MultiPlate-v1"]["episode0"]
    plates_in_view = [n for n in multi_plate["in_view"] if n.startswith("plate_")]
    assert plates_in_view == sorted([f"plate_{multi_plate['plate']}", f"plate_{multi_plate['extra']}"])
    assert len(results[MAIN]["episode0"]["in_view"]) == 2  # one object, one plate


def test_position_places_outside_the_training_square(probed):
    report = probed[0]["PutOnPlateInScene25Position-v1"]
    for drawn in [*report["seeds"], report["episode0"]]:
        assert drawn["pos"] >= 784 and drawn["quat"] >= 4  # after Main's 784 placements and 4 yaws
    x, y, z = report["episode0"]["object_p"]
    assert max(abs(x + 0.16), abs(y)) > 0.08 and z == pytest.approx(0.95)  # the square: 7.5 cm around (-0.16, 0)


def test_ee_pose_starts_the_arm_elsewhere(probed):
    results = probed[0]
    main, moved = results[MAIN]["episode0"], results["PutOnPlateInScene25EEPose-v1"]["episode0"]
    assert moved["ee_pose"] == 1
    offset = np.asarray(moved["qpos"]) - np.asarray(main["qpos"])
    assert np.allclose(offset, [-0.15, -0.15, -0.08, -0.15, -0.15, -0.6, 0, 0], atol=1e-5)
    assert np.linalg.norm(np.asarray(moved["ee_p"]) - np.asarray(main["ee_p"])) > 0.02


def test_position_change_moves_the_object_at_step_5(probed):
    report = probed[0]["PutOnPlateInScene25PositionChangeTo-v1"]
    start, target = np.asarray(report["episode0"]["placements"])[[0, 2], :2]
    xy = np.asarray(report["object_p_per_step"])[:, :2]  # after steps 1..6
    assert np.linalg.norm(target - start) > 0.15
    assert np.linalg.norm(xy[:4] - start, axis=1).max() < 0.05  # it lands and settles near its start
    assert np.abs(xy[4] - target).max() < 1e-3  # moved when step 5 is evaluated
    assert np.linalg.norm(xy[5] - target) < 0.05


def test_missing_assets_fail_with_the_download_command(tmp_path, monkeypatch):
    import bridge_standin

    from common.envs.maniskill import check_env_id
    from common.envs.put_on_plate_25_ood import (
        PutOnPlateInScene25MainV3,
        PutOnPlateInScene25MultiPlate,
        PutOnPlateInScene25VisionWhole03,
    )

    download = "hf download --repo-type dataset RLinf/maniskill_assets"
    monkeypatch.setenv("MS_ASSET_DIR", str(tmp_path / "empty"))
    for env_id in OOD_IDS:
        with pytest.raises(FileNotFoundError, match=download):
            check_env_id(env_id)
    with pytest.raises(FileNotFoundError, match=download):  # the variant itself, before it builds anything
        PutOnPlateInScene25MultiPlate(num_envs=1, sim_backend="physx_cpu")
    monkeypatch.setenv("MS_ASSET_DIR", str(bridge_standin.build(tmp_path / "standin")))
    texture = tmp_path / "standin/data/tasks/rlinf_maniskill_assets/carrot/more_table/textures/texture_03.png"
    texture.unlink()
    assert PutOnPlateInScene25VisionWhole03.missing_assets() == [str(texture)]
    assert PutOnPlateInScene25MainV3.missing_assets() == []  # the Main task reads no textures


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    probe(sys.argv[1])
