"""PutOnPlateInScene25Main-v3: the WidowX Bridge digital twin with 25 objects, the task RLinf and RL4VLA train OpenVLA
on (RLinf `rlinf/envs/maniskill/tasks/put_on_in_scene_multi.py`, class PutOnPlateInScene25MainV3). mani-skill 3.0.1 does
not ship it; importing this module registers it.

Each episode draws one of the 25 objects, the plate, one of 21 real table photos (the background pasted over everything
that is not the robot or an object) and one of the object/plate placements and yaws. `obj_set` splits the objects and
backgrounds: "train" (objects 0-15, backgrounds 0-15), "test" (objects 16-24, backgrounds 16-20), "all".
The instruction is "put {object} on {plate}". Success: the object rests on the plate (its centre within the plate's
half-size in xy, its bottom within 5 cm of the plate's top, and a contact force between them). All objects are built in
every scene; the ones not drawn wait on a shelf behind the camera.

Assets: mani-skill's Bridge scene and WidowX robot, and RLinf's object set (its `carrot/` folder) under
`{MS_ASSET_DIR}/data/tasks/rlinf_maniskill_assets/` (MS_ASSET_DIR defaults to ~/.maniskill); see DOWNLOAD_COMMAND.

RLinf's 13 out-of-distribution variants (common/envs/put_on_plate_25_ood.py) subclass this task through its hooks: which
indices an episode id encodes (`_episode_fields`, `_decode_episode`), the placements (`_init_poses`, `_layout`), the
arm's start (`_initial_qpos`), the image (`_load_tables`, `_overlay`), the instruction and the files read
(`_asset_files`).
"""

import math
import os
from pathlib import Path

import cv2
import numpy as np
import sapien
import torch
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.envs.tasks.digital_twins.bridge_dataset_eval.base_env import (
    BaseBridgeEnv,
    WidowX250SBridgeDatasetFlatTable,
)
from mani_skill.utils import io_utils, sapien_utils
from mani_skill.utils.geometry import rotation_conversions
from mani_skill.utils.registration import register_env
from mani_skill.utils.structs.pose import Pose
from sapien.physx import PhysxMaterial
from transforms3d.euler import euler2quat

ENV_ID = "PutOnPlateInScene25Main-v3"
CUSTOM_ASSETS = "tasks/rlinf_maniskill_assets"  # RLinf's `maniskill_assets` dataset, under mani-skill's data folder
OBJ_SETS = {"train": (16, 0, 16, 0), "test": (9, 16, 5, 16), "all": (25, 0, 21, 0)}  # objects, offset, tables, offset


def asset_root() -> Path:
    """mani-skill's data folder, read when called (mani-skill itself reads MS_ASSET_DIR once, at import)."""
    return Path(os.getenv("MS_ASSET_DIR", os.path.join(os.path.expanduser("~"), ".maniskill"))) / "data"


def download_command() -> str:
    root = asset_root()
    return (
        "python -m mani_skill.utils.download_asset bridge_v2_real2sim -y && "
        "python -m mani_skill.utils.download_asset widowx250s -y && "
        f"hf download --repo-type dataset RLinf/maniskill_assets --local-dir {root / CUSTOM_ASSETS}"
    )


def missing_assets() -> list[str]:
    """The files PutOnPlateInScene25Main-v3 reads that are not on disk (empty when everything is there)."""
    return PutOnPlateInScene25MainV3.missing_assets()


def read_rgb(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB image file resized (bilinear) to hw."""
    return cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), hw[::-1])


def square_grid(steps: np.ndarray) -> np.ndarray:
    """(G, 2) xy points of the 15 cm square in front of the robot (centre (-0.16, 0), half-edge 7.5 cm) at the
    fractions `steps` of its edge along x and y, x varying slowest. Steps are rounded to 0.1 so the points are the
    same doubles as RLinf's literal grids (its 15 cm spacing tests land exactly on grid distances)."""
    steps = np.round(steps, 1)
    grid = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2) * 2 - 1
    return grid * np.array([0.075, 0.075]) + np.array([-0.16, 0.0])


def yaw_quats(yaws) -> np.ndarray:
    """(Y, 2, 4) quaternions: the object turned by each yaw about z, the plate unrotated."""
    return np.asarray([[euler2quat(0, 0, yaw), [1, 0, 0, 0]] for yaw in yaws], dtype=np.float32)


def pair_placements(grid: np.ndarray, obj_z: float = 0.90, plate_z: float = 0.90) -> np.ndarray:
    """(P, 2, 3) object and plate positions: every ordered pair of distinct grid points more than 7 cm apart."""
    xyz = [
        [[*a, obj_z], [*b, plate_z]]
        for i, a in enumerate(grid)
        for j, b in enumerate(grid)
        if i != j and np.linalg.norm(b - a) > 0.070
    ]
    return np.asarray(xyz, dtype=np.float32)


@register_env(ENV_ID, max_episode_steps=80, asset_download_ids=["bridge_v2_real2sim"])
class PutOnPlateInScene25MainV3(BaseBridgeEnv):
    """Reuses mani-skill's Bridge base for the robot, lighting, simulation rates and table scene; replaces its fixed
    object pair and single background by the per-episode draw above."""

    SUPPORTED_OBS_MODES = ["rgb+segmentation"]
    SUPPORTED_REWARD_MODES = ["none"]
    rgb_overlay_mode = "none"  # the base class's one-image greenscreen; this task pastes one image per episode
    obj_static_friction = obj_dynamic_friction = 1.0
    camera_name = "3rd_view_camera"
    image_hw = (480, 640)
    initial_qpos = np.array([-0.01840777, 0.0398835, 0.22242722, -0.00460194, 1.36524296, 0.00153398, 0.037, 0.037])
    robot_pose = sapien.Pose([0.147, 0.028, 0.870], q=[0, 0, 0, 1])

    uses_all_plates = False  # the Main task builds and draws the first plate of more_plate only

    def __init__(self, obj_set: str = "train", **kwargs):
        if obj_set not in OBJ_SETS:
            raise ValueError(f"obj_set must be one of {sorted(OBJ_SETS)}, got {obj_set!r}")
        missing = self.missing_assets()
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__} needs assets that are not on disk ({missing[0]}, ...). "
                f"Download them with: {download_command()}"
            )
        self.obj_set = obj_set
        custom = asset_root() / CUSTOM_ASSETS / "carrot"
        self.custom_dir = custom
        self.object_db = io_utils.load_json(custom / "more_carrot" / "model_db.json")
        plate_db = io_utils.load_json(custom / "more_plate" / "model_db.json")
        first_plate = next(iter(plate_db))
        self.plate_db = plate_db if self.uses_all_plates else {first_plate: plate_db[first_plate]}
        self._load_tables(custom / "more_table")
        self.object_names, self.plate_names = list(self.object_db), list(self.plate_db)
        n_obj, _, n_tables, _ = OBJ_SETS["all"]
        n_plates = 17 if self.uses_all_plates else 1
        if len(self.object_names) < n_obj or len(self.plate_names) < n_plates or len(self.backgrounds) < n_tables:
            raise ValueError(f"{custom} must hold {n_obj} objects, {n_plates} plates and {n_tables} table images")
        self.xyz_configs, self.quat_configs = self._init_poses()
        # BaseBridgeEnv.__init__ loads mani-skill's own object pair; this task builds its objects in _load_scene.
        BaseEnv.__init__(self, robot_uids=WidowX250SBridgeDatasetFlatTable, **kwargs)

    def _load_tables(self, folder: Path) -> None:
        """The table photos named in more_table/model_db.json, in its order: backgrounds (21, H, W, 3) uint8."""
        self.table_db = io_utils.load_json(folder / "model_db.json")
        self.backgrounds = np.stack([read_rgb(folder / "imgs" / name, self.image_hw) for name in self.table_db])

    @classmethod
    def missing_assets(cls) -> list[str]:
        """The files this task reads that are not on disk (empty when everything is there)."""
        return [str(p) for p in cls._asset_files() if not p.exists()]

    @classmethod
    def _asset_files(cls) -> list[Path]:
        """Every file the task reads: the robot, the scene, and each object, plate and photo its model_db lists."""
        root = asset_root()
        custom = root / CUSTOM_ASSETS / "carrot"
        need = [
            root / "robots/widowx/wx250s.urdf",
            root / "tasks/bridge_v2_real2sim_dataset/stages/bridge_table_1_v1.glb",
        ]
        for kind in ("more_carrot", "more_plate"):
            db_path = custom / kind / "model_db.json"
            need.append(db_path)
            if db_path.exists():
                need += [custom / kind / name / "collision.obj" for name in io_utils.load_json(db_path)]
        table_db = custom / "more_table" / "model_db.json"
        need.append(table_db)
        if table_db.exists():
            need += [custom / "more_table" / "imgs" / name for name in io_utils.load_json(table_db)]
        return need

    def _init_poses(self) -> tuple[np.ndarray, np.ndarray]:
        """(P, 2, 3) object and plate positions on a 6 x 6 grid of the 15 cm square in front of the robot, at least
        7 cm apart, both at z 0.90, and (4, 2, 4) quaternions: object yaw 0, 45, 90, 135 degrees, plate unrotated."""
        return pair_placements(square_grid(np.linspace(0.0, 1.0, 6))), yaw_quats(np.arange(4) * np.pi / 4)

    # -- episode draw --------------------------------------------------------------------------------------------
    def _episode_fields(self) -> list[tuple[str, int, int]]:
        """(name, count, offset) of each index an episode id encodes, the slowest-varying first: the id is a number
        whose digits, in these bases, pick index offset + digit."""
        n_obj, obj_offset, n_tables, table_offset = OBJ_SETS[self.obj_set]
        return [
            ("obj", n_obj, obj_offset),
            ("plate", len(self.plate_names), 0),
            ("table", n_tables, table_offset),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]

    @property
    def total_num_trials(self) -> int:
        return math.prod(count for _, count, _ in self._episode_fields())

    def _decode_episode(self, episode_id: torch.Tensor) -> dict[str, torch.Tensor]:
        """episode id -> the indices of `_episode_fields` (object, plate, background, placement, yaw); ids past
        total_num_trials wrap around, as in RLinf."""
        drawn, rest = {}, episode_id
        for name, count, offset in reversed(self._episode_fields()):
            drawn[name] = rest % count + offset
            rest = rest // count
        return dict(reversed(drawn.items()))

    # -- scene ---------------------------------------------------------------------------------------------------
    def _build_model(self, folder: Path, name: str, info: dict, index: int, parked_x: float):
        material = PhysxMaterial(
            static_friction=self.obj_static_friction, dynamic_friction=self.obj_dynamic_friction, restitution=0.0
        )
        scale = float(self._batched_episode_rng[0].choice(info.get("scale", [1.0])))
        builder = self.scene.create_actor_builder()
        builder.add_multiple_convex_collisions_from_file(
            str(folder / name / "collision.obj"),
            scale=[scale] * 3,
            material=material,
            density=info.get("density", 1000),
        )
        visual = next(
            (
                folder / name / f"textured.{ext}"
                for ext in ("obj", "dae", "glb")
                if (folder / name / f"textured.{ext}").exists()
            ),
            folder / name / "collision.obj",
        )
        builder.add_visual_from_file(str(visual), scale=[scale] * 3)
        builder.initial_pose = sapien.Pose(self._parked(index, parked_x))
        bbox = np.asarray(info["bbox"]["max"]) - np.asarray(info["bbox"]["min"])
        return builder.build(name=name), torch.as_tensor(bbox * scale, dtype=torch.float32, device=self.device)

    @staticmethod
    def _parked(index: int, x: float) -> list[float]:
        return [x, 0.3 * index, 0.05]

    def _load_scene(self, options: dict):
        for robot in self.agent.robot._objs:
            sapien_utils.set_articulation_render_material(robot, specular=0.9, roughness=0.3)
        scene_file = str(asset_root() / "tasks/bridge_v2_real2sim_dataset/stages/bridge_table_1_v1.glb")
        builder = self.scene.create_actor_builder()
        scene_pose = sapien.Pose(q=[0.707, 0.707, 0, 0])  # the scene file is y-up
        builder.add_nonconvex_collision_from_file(scene_file, pose=scene_pose)
        builder.add_visual_from_file(scene_file, pose=scene_pose)
        builder.initial_pose = sapien.Pose([2.0634, 2.8313, 0.0])
        builder.build_static(name="arena")
        shelf = self.scene.create_actor_builder()  # behind the camera: holds the objects not drawn this episode
        shelf.add_box_collision(half_size=[1.0, 5.0, 0.05])
        shelf.initial_pose = sapien.Pose([1.5, 3.5, -0.05])
        shelf.build_static(name="shelf")
        objects = [
            self._build_model(self.custom_dir / "more_carrot", n, self.object_db[n], i, 1.0)
            for i, n in enumerate(self.object_names)
        ]
        plates = [
            self._build_model(self.custom_dir / "more_plate", n, self.plate_db[n], i, 2.0)
            for i, n in enumerate(self.plate_names)
        ]
        self.objects, self.object_bbox = [a for a, _ in objects], torch.stack([b for _, b in objects])  # (K, 3)
        self.plates, self.plate_bbox = [a for a, _ in plates], torch.stack([b for _, b in plates])

    def _after_reconfigure(self, options: dict):
        super()._after_reconfigure(options)
        keep = [link.per_scene_id for link in self.agent.robot.get_links()]
        keep += [actor.per_scene_id for actor in self.objects + self.plates]
        self.foreground_ids = torch.unique(torch.cat([torch.as_tensor(k).flatten() for k in keep]))

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
        b = len(env_idx)
        if "episode_id" in options:
            episode_id = torch.as_tensor(options["episode_id"], device=self.device).reshape(b)
        else:
            episode_id = torch.randint(0, self.total_num_trials, (b,), device=self.device)  # seeded by reset(seed)
        drawn = self._decode_episode(episode_id)
        if not hasattr(self, "episode"):
            zeros = lambda: torch.zeros(self.num_envs, dtype=torch.long, device=self.device)  # noqa: E731
            self.episode = {k: zeros() for k in ("id", *drawn)}
            self.background = torch.zeros((self.num_envs, *self.image_hw, 3), dtype=torch.uint8, device=self.device)
            self.consecutive_grasp = torch.zeros(self.num_envs, dtype=torch.int32, device=self.device)
            self.ever_grasped = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
            self.ever_consecutive_grasp = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
            self.obj_bbox_world = torch.zeros((self.num_envs, 3), device=self.device)
            self.plate_bbox_world = torch.zeros((self.num_envs, 3), device=self.device)
        self.episode["id"][env_idx] = episode_id
        for key, value in drawn.items():
            self.episode[key][env_idx] = value
        self.background[env_idx] = torch.as_tensor(
            self.backgrounds[self.episode["table"][env_idx].cpu().numpy()], device=self.device
        )
        xyz = torch.as_tensor(self.xyz_configs, device=self.device)[self.episode["pos"][env_idx]]  # (b, 2, 3)
        quat = torch.as_tensor(self.quat_configs, device=self.device)[self.episode["quat"][env_idx]]  # (b, 2, 4)
        self.agent.robot.set_pose(self.robot_pose)
        for actors, parked_x, placed in self._layout(env_idx, xyz, quat):
            for i, actor in enumerate(actors):
                p = torch.tensor(self._parked(i, parked_x), device=self.device).expand(b, 3)
                q = torch.tensor([1.0, 0, 0, 0], device=self.device).expand(b, 4)
                for chosen, p_at, q_at in placed:  # a later placement of the same actor wins
                    here = (chosen == i)[:, None]
                    p, q = torch.where(here, p_at, p), torch.where(here, q_at, q)
                actor.set_pose(Pose.create_from_pq(p=p, q=q))
        self.agent.reset(init_qpos=self._initial_qpos(env_idx))
        self.obj_bbox_world[env_idx] = _rotated_extent(self.object_bbox[self.episode["obj"][env_idx]], quat[:, 0])
        self.plate_bbox_world[env_idx] = _rotated_extent(self.plate_bbox[self.episode["plate"][env_idx]], quat[:, 1])
        self.consecutive_grasp[env_idx] = 0
        self.ever_grasped[env_idx] = False
        self.ever_consecutive_grasp[env_idx] = False

    def _layout(self, env_idx: torch.Tensor, xyz: torch.Tensor, quat: torch.Tensor):
        """Where the actors of each set stand this episode: (actors, x of their shelf row, placements), a placement
        being (index of the actor drawn (b,), position (b, 3), quaternion (b, 4)); the others wait on the shelf."""
        return [
            (self.objects, 1.0, [(self.episode["obj"][env_idx], xyz[:, 0], quat[:, 0])]),
            (self.plates, 2.0, [(self.episode["plate"][env_idx], xyz[:, 1], quat[:, 1])]),
        ]

    def _initial_qpos(self, env_idx: torch.Tensor):
        """The robot's joint positions at the start of the episode (the Bridge dataset's measured pose)."""
        return self.initial_qpos

    # -- observation, success, instruction -----------------------------------------------------------------------
    def _get_obs_sensor_data(self, apply_texture_transforms: bool = True):
        obs = super()._get_obs_sensor_data(apply_texture_transforms)
        camera = obs[self.camera_name]
        segmentation = camera["segmentation"][..., 0]
        foreground = torch.isin(segmentation, self.foreground_ids.to(segmentation.device))[..., None]
        camera["rgb"] = self._overlay(camera["rgb"], foreground)
        return obs

    def _overlay(self, rgb: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 camera image, (N, H, W, 1) bool robot-or-object mask -> the image the policy sees: the
        episode's table photo everywhere but the robot and the objects."""
        return torch.where(foreground, rgb, self.background.to(rgb.device))

    def _drawn_pose(self, actors, chosen: torch.Tensor) -> Pose:
        rows = torch.arange(self.num_envs, device=self.device)
        p = torch.stack([a.pose.p for a in actors])[chosen, rows]  # (N, 3)
        q = torch.stack([a.pose.q for a in actors])[chosen, rows]
        return Pose.create_from_pq(p=p, q=q)

    def evaluate(self):
        obj, plate = self.episode["obj"], self.episode["plate"]
        obj_p, plate_p = self._drawn_pose(self.objects, obj).p, self._drawn_pose(self.plates, plate).p
        grasped = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        contact = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        for i, actor in enumerate(self.objects):
            drawn = obj == i
            if not drawn.any():
                continue
            grasped |= drawn & self.agent.is_grasping(actor)
            for j, plate_actor in enumerate(self.plates):
                force = torch.linalg.norm(self.scene.get_pairwise_contact_forces(actor, plate_actor), dim=-1)
                contact |= drawn & (plate == j) & (force > 0.03)
        self.consecutive_grasp = torch.where(grasped, self.consecutive_grasp + 1, 0)
        self.ever_grasped |= grasped
        self.ever_consecutive_grasp |= self.consecutive_grasp >= 5
        offset = obj_p - plate_p
        plate_half, obj_half = self.plate_bbox_world / 2, self.obj_bbox_world / 2
        xy_ok = torch.linalg.norm(offset[:, :2], dim=1) <= plate_half.max(dim=1).values + 0.01
        z_ok = (offset[:, 2] > 0) & (offset[:, 2] - plate_half[:, 2] - obj_half[:, 2] <= 0.05)
        on_plate = xy_ok & z_ok & contact
        return dict(
            success=on_plate,
            src_on_target=on_plate,
            is_src_obj_grasped=self.ever_grasped,
            consecutive_grasp=self.ever_consecutive_grasp,
        )

    def drawn_names(self) -> list[tuple[str, str]]:
        """Per env: the names of the object and the plate drawn this episode."""
        return [
            (self.object_db[self.object_names[o]]["name"], self.plate_db[self.plate_names[p]]["name"])
            for o, p in zip(self.episode["obj"].tolist(), self.episode["plate"].tolist())
        ]

    def get_language_instruction(self, **kwargs) -> list[str]:
        return [f"put {obj} on {plate}" for obj, plate in self.drawn_names()]


def _rotated_extent(size: torch.Tensor, quat: torch.Tensor) -> torch.Tensor:
    """(b, 3) box sizes rotated by (b, 4) quaternions -> (b, 3) sizes of their axis-aligned bounding boxes."""
    rotation = rotation_conversions.quaternion_to_matrix(quat).abs()  # |R| @ size is the AABB extent of a rotated box
    return (rotation @ size[..., None])[..., 0]
