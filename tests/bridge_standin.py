"""A stand-in for the PutOnPlateInScene25Main-v3 assets, in their real layout under a mani-skill data folder, built
from primitive shapes: a WidowX-like arm with the real joint and link names, a table slab as the Bridge scene file,
25 small boxes, 17 flat plates (the Main task uses the first), 21 one-colour table photos, each paired with a
one-colour texture (the VisionTexture/VisionWhole variants blend it in). Lets the real task code and its
out-of-distribution variants (common/envs/put_on_plate_25_ood.py) run where the real assets cannot be downloaded."""

import json
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple"]


def _link(name: str, box=None, origin=(0, 0, 0), mass: float = 0.1) -> str:
    geometry = ""
    if box is not None:
        xyz, size = " ".join(map(str, origin)), " ".join(map(str, box))
        shape = f'<origin xyz="{xyz}"/><geometry><box size="{size}"/></geometry>'
        geometry = f"<visual>{shape}</visual><collision>{shape}</collision>"
    inertia = '<inertia ixx="1e-4" iyy="1e-4" izz="1e-4" ixy="0" ixz="0" iyz="0"/>'
    inertial = f'<inertial><mass value="{mass}"/>{inertia}</inertial>'
    return f'<link name="{name}">{inertial}{geometry}</link>'


def _joint(name, kind, parent, child, xyz, axis=(0, 0, 1), limits=(-3.1, 3.1)) -> str:
    limit = f'<limit lower="{limits[0]}" upper="{limits[1]}" effort="100" velocity="3"/>' if kind != "fixed" else ""
    return (
        f'<joint name="{name}" type="{kind}"><parent link="{parent}"/><child link="{child}"/>'
        f'<origin xyz="{" ".join(map(str, xyz))}"/><axis xyz="{" ".join(map(str, axis))}"/>{limit}</joint>'
    )


def widowx_urdf() -> str:
    """A 6-joint arm (waist, shoulder, elbow, forearm_roll, wrist_angle, wrist_rotate) with two prismatic fingers and
    an ee_gripper_link, sized like a WidowX 250."""
    links = [
        _link("base_link", (0.1, 0.1, 0.06), (0, 0, 0.03), 1.0),
        _link("shoulder_link", (0.04, 0.04, 0.03)),
        _link("upper_arm_link", (0.03, 0.03, 0.2), (0.0, 0, 0.125)),
        _link("upper_forearm_link", (0.15, 0.03, 0.03), (0.09, 0, 0)),
        _link("lower_forearm_link", (0.05, 0.03, 0.03), (0.04, 0, 0)),
        _link("wrist_link", (0.04, 0.03, 0.03), (0.03, 0, 0)),
        _link("gripper_link", (0.04, 0.05, 0.02), (0.03, 0, 0)),
        _link("ee_gripper_link"),
        _link("left_finger_link", (0.04, 0.008, 0.02), (0.02, 0.004, 0), 0.02),
        _link("right_finger_link", (0.04, 0.008, 0.02), (0.02, -0.004, 0), 0.02),
    ]
    joints = [
        _joint("waist", "revolute", "base_link", "shoulder_link", (0, 0, 0.072)),
        _joint("shoulder", "revolute", "shoulder_link", "upper_arm_link", (0, 0, 0.039), (0, 1, 0), (-1.8, 1.9)),
        _joint("elbow", "revolute", "upper_arm_link", "upper_forearm_link", (0.05, 0, 0.25), (0, 1, 0), (-2.1, 1.6)),
        _joint("forearm_roll", "revolute", "upper_forearm_link", "lower_forearm_link", (0.175, 0, 0), (1, 0, 0)),
        _joint("wrist_angle", "revolute", "lower_forearm_link", "wrist_link", (0.075, 0, 0), (0, 1, 0), (-1.7, 2.1)),
        _joint("wrist_rotate", "revolute", "wrist_link", "gripper_link", (0.065, 0, 0), (1, 0, 0)),
        _joint("ee_gripper", "fixed", "gripper_link", "ee_gripper_link", (0.1, 0, 0)),
        _joint("left_finger", "prismatic", "gripper_link", "left_finger_link", (0.07, 0, 0), (0, 1, 0), (0.01, 0.04)),
        _joint(
            "right_finger", "prismatic", "gripper_link", "right_finger_link", (0.07, 0, 0), (0, -1, 0), (0.01, 0.04)
        ),
    ]
    return f'<?xml version="1.0"?><robot name="wx250s">{"".join(links)}{"".join(joints)}</robot>'


def _write_box(folder: Path, size) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    mesh = trimesh.creation.box(extents=size)
    mesh.export(folder / "collision.obj")
    mesh.export(folder / "textured.obj")
    half = np.asarray(size) / 2
    return {"bbox": {"min": (-half).tolist(), "max": half.tolist()}, "scale": [1.0], "density": 500}


def build(ms_asset_dir: Path) -> Path:
    """Write the stand-in under `ms_asset_dir` (use it as MS_ASSET_DIR) and return that folder."""
    data = Path(ms_asset_dir) / "data"
    robot = data / "robots" / "widowx"
    robot.mkdir(parents=True, exist_ok=True)
    (robot / "wx250s.urdf").write_text(widowx_urdf())
    stages = data / "tasks" / "bridge_v2_real2sim_dataset" / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    # The scene file is y-up and placed at (2.0634, 2.8313, 0) rotated +90 deg about x: a slab whose top is at world
    # z = 0.87 over x in [-0.6, 0.05], y in [-0.4, 0.4].
    slab = trimesh.creation.box(extents=[0.65, 0.1, 0.8])
    slab.apply_translation([-0.275 - 2.0634, 0.82, 2.8313])
    slab.export(stages / "bridge_table_1_v1.glb")
    custom = data / "tasks" / "rlinf_maniskill_assets" / "carrot"
    objects = {}
    for i in range(25):
        info = _write_box(custom / "more_carrot" / f"object_{i:02d}", [0.03, 0.03, 0.03])
        objects[f"object_{i:02d}"] = {**info, "name": f"{COLOURS[i % 5]} block {i}"}
    (custom / "more_carrot" / "model_db.json").write_text(json.dumps(objects))
    plates = {"plate_0": {**_write_box(custom / "more_plate" / "plate_0", [0.16, 0.16, 0.01]), "name": "plate"}}
    for i in range(1, 17):  # the 16 plates only the Plate and MultiPlate variants draw: smaller and square
        info = _write_box(custom / "more_plate" / f"plate_{i}", [0.12, 0.12, 0.01])
        plates[f"plate_{i}"] = {**info, "name": f"{COLOURS[i % 5]} dish {i}"}
    (custom / "more_plate" / "model_db.json").write_text(json.dumps(plates))
    tables = custom / "more_table"
    (tables / "imgs").mkdir(parents=True, exist_ok=True)
    (tables / "textures").mkdir(parents=True, exist_ok=True)
    table_db = {}
    for i in range(21):
        Image.new("RGB", (8, 6), (10 * i, 200 - 5 * i, 90)).save(tables / "imgs" / f"table_{i:02d}.png")
        Image.new("RGB", (8, 6), (90, 90, 10 * i)).save(tables / "textures" / f"texture_{i:02d}.png")
        table_db[f"table_{i:02d}.png"] = {"texture": f"texture_{i:02d}.png", "mix": 0.5}
    (tables / "model_db.json").write_text(json.dumps(table_db))
    return Path(ms_asset_dir)
