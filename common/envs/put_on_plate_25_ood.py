"""The 13 out-of-distribution variants of PutOnPlateInScene25Main-v3 that RLinf evaluates generalisation on (RLinf
`rlinf/envs/maniskill/tasks/variants/`, doc `docs/source-en/rst_source/evaluations/guides/maniskill_ood.rst`; the
protocol of RL4VLA, arXiv 2505.19789). Importing this module registers them; each runs 80 steps like the Main task.

Each follows RLinf's file of the same name in `variants/` (put_on_plate_25_<name>.py, named after "->"):

Vision
  PutOnPlateInScene25VisionImage-v1       the table photos of obj_set (test: the 5 unseen ones) -> vision_image
  PutOnPlateInScene25VisionTexture03-v1   robot and objects blended 0.3 x mix with the photo's texture -> vision_texture
  PutOnPlateInScene25VisionTexture05-v1   the same at 0.5 x mix -> vision_texture
  PutOnPlateInScene25VisionWhole03-v1     the whole frame blended 0.3 x mix with the photo's texture -> vision_whole
  PutOnPlateInScene25VisionWhole05-v1     the same at 0.5 x mix -> vision_whole
Semantic
  PutOnPlateInScene25Carrot-v1            the objects of obj_set (test: the 9 unseen ones) -> carrot
  PutOnPlateInScene25Plate-v1             the plates of obj_set (test: the 16 after the training one) -> plate
  PutOnPlateInScene25Instruct-v1          the instruction template (test: 16 paraphrases of "put X on Y") -> instruct
  PutOnPlateInScene25MultiCarrot-v1       a second object of obj_set, 15 cm from the first -> multi_carrot
  PutOnPlateInScene25MultiPlate-v1        a second plate, 15 cm from the target plate -> multi_plate
Execution
  PutOnPlateInScene25Position-v1          test: placements on a ring around the training square, new yaws -> position
  PutOnPlateInScene25EEPose-v1            test: the arm starts with joint offsets up to 0.15 rad (0.6 rad) -> ee_pose
  PutOnPlateInScene25PositionChangeTo-v1  test, all: the object jumps 15+ cm away at step 5 -> position_change

The OOD protocol runs each with obj_set="test". With "train", Carrot, VisionImage, Plate, Instruct and EEPose draw the
scenes of Main-v3 with obj_set "train" (in RLinf's episode order), Position and PositionChangeTo the same on their own
placements (RLinf starts their objects at z 0.95, Main's at 0.90) and without their change, while MultiCarrot and
MultiPlate keep their distractor and Texture and Whole blend in every split (there the split only sets how often the
scenes repeat). Unless a row says otherwise a variant draws the 16 training objects, the first plate and the 16
training photos. Episode ids decode as in RLinf (the same fields, counts, offsets and order), so an id names the same
scene here and there. Success, the instruction "put {object} on {plate}" and the shelf that holds the actors not drawn
are the Main task's (common/envs/put_on_plate_25.py).

Departures from RLinf, all where its code couples envs of one batch (results are identical with num_envs=1, and for
envs in lock-step): VisionTexture resizes each env's texture to that env's own robot-and-objects box (RLinf: to the
largest box of the batch, then crops its top-left corner); PositionChangeTo moves an env's object at that env's 5th
step (RLinf: every env's, at env 0's 5th step).
"""

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from mani_skill.utils import io_utils
from mani_skill.utils.registration import register_env
from mani_skill.utils.structs.pose import Pose

from common.envs.put_on_plate_25 import (
    CUSTOM_ASSETS,
    OBJ_SETS,
    PutOnPlateInScene25MainV3,
    asset_root,
    pair_placements,
    read_rgb,
    square_grid,
    yaw_quats,
)

OBJECTS = {name: sets[:2] for name, sets in OBJ_SETS.items()}  # (count, offset): 16 seen, 9 unseen, all 25
TABLES = {name: sets[2:] for name, sets in OBJ_SETS.items()}  # (count, offset): 16 seen, 5 unseen, all 21 photos
SEEN = (16, 0)  # the training objects, or the training photos
FIRST_OR_OTHERS = {"train": (1, 0), "test": (16, 1), "all": (17, 0)}  # index 0, the 16 after it, or all 17
INSTRUCTION_TEMPLATES = [  # RLinf put_on_plate_25_instruct.py; index 0 is the Main task's
    "put {obj} on {plate}",
    "Place the {obj} on the {plate}",
    "set {obj} on {plate}",
    "move the {obj} to the {plate}",
    "Take the {obj} and put it on the {plate}",
    "pick up {obj} and set it down on {plate}",
    "please put the {obj} on the {plate}",
    "Put {obj} onto {plate}.",
    "place the {obj} onto the {plate} surface",
    "Make sure {obj} is on {plate}.",
    "on the {plate}, put the {obj}",
    "put the {obj} where the {plate} is",
    "Move the {obj} from the table to the {plate}",
    "Move {obj} so it\u2019s on {plate}.",
    "Can you put {obj} on {plate}?",
    "{obj} on the {plate}, please.",
    "the {obj} should be placed on the {plate}.",
    "Lay the {obj} down on the {plate}.",  # the last four are never drawn (17 templates at most, as in RLinf)
    "could you place {obj} over {plate}",
    "position the {obj} atop the {plate}",
    "Arrange for the {obj} to be resting on {plate}.",
]


def _register(env_id: str):
    return register_env(env_id, max_episode_steps=80, asset_download_ids=["bridge_v2_real2sim"])


def _main_yaws() -> np.ndarray:
    return yaw_quats(np.arange(4) * np.pi / 4)


def _triples(z: tuple[float, float, float], min_gap: tuple[float, float, float]) -> np.ndarray:
    """(P, 3, 3) positions of the object, the plate and a third spot on the Main task's 6 x 6 grid, every triple whose
    object-plate, plate-third and object-third distances exceed min_gap, object varying slowest."""
    grid = square_grid(np.linspace(0.0, 1.0, 6))
    xyz = [
        [[*a, z[0]], [*b, z[1]], [*c, z[2]]]
        for a, b, c in itertools.product(grid, repeat=3)
        if np.linalg.norm(a - b) > min_gap[0]
        and np.linalg.norm(c - b) > min_gap[1]
        and np.linalg.norm(a - c) > min_gap[2]
    ]
    return np.asarray(xyz, dtype=np.float32)


def _mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(H, W) bool -> (ymin, ymax, xmin, xmax) of its True pixels, inclusive; (0, 0, 0, 0) when there are none."""
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    if len(rows) == 0:
        return 0, 0, 0, 0
    return rows[0].item(), rows[-1].item(), cols[0].item(), cols[-1].item()


# -- vision -----------------------------------------------------------------------------------------------------------
@_register("PutOnPlateInScene25VisionImage-v1")
class PutOnPlateInScene25VisionImage(PutOnPlateInScene25MainV3):
    """The table photos of obj_set (test: the 5 unseen ones), the 16 training objects."""

    def _episode_fields(self):
        return [
            ("obj", *SEEN),
            ("plate", len(self.plate_names), 0),
            ("table", *TABLES[self.obj_set]),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]


class _TexturedScene(PutOnPlateInScene25MainV3):
    """Training scenes (16 objects, 16 photos) whose frame is blended with a texture: the one more_table/model_db.json
    pairs with the episode's photo, at weight `texture_strength` x that photo's "mix"."""

    texture_strength: float
    texture_hw: tuple[int, int]  # the size the texture files are loaded at

    @classmethod
    def _asset_files(cls):
        need = super()._asset_files()
        tables = asset_root() / CUSTOM_ASSETS / "carrot" / "more_table"
        if (tables / "model_db.json").exists():
            need += [tables / "textures" / t["texture"] for t in io_utils.load_json(tables / "model_db.json").values()]
        return need

    def _load_tables(self, folder):
        super()._load_tables(folder)
        textures = [read_rgb(folder / "textures" / t["texture"], self.texture_hw) for t in self.table_db.values()]
        self.textures = torch.as_tensor(np.stack(textures))  # (21, *texture_hw, 3) uint8
        self.texture_mix = torch.tensor([t["mix"] for t in self.table_db.values()], dtype=torch.float32)

    def _episode_fields(self):
        # RLinf decodes a further index here that nothing reads: obj_set "test" replays the training scenes 16 times.
        return [
            ("obj", *SEEN),
            ("repeat", *FIRST_OR_OTHERS[self.obj_set]),
            ("plate", len(self.plate_names), 0),
            ("table", *SEEN),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]

    def _episode_textures(self, device) -> list[tuple[torch.Tensor, float]]:
        """Per env: its texture (*texture_hw, 3) uint8 on `device` and its blend weight."""
        if self.textures.device != device:
            self.textures = self.textures.to(device)
        table = self.episode["table"].cpu()
        weights = (self.texture_mix[table] * self.texture_strength).tolist()
        return [(self.textures[t], weight) for t, weight in zip(table.tolist(), weights)]


@_register("PutOnPlateInScene25VisionTexture03-v1")
class PutOnPlateInScene25VisionTexture03(_TexturedScene):
    """Inside the box around the robot and the objects, their pixels become texture x w + camera x (1 - w), the
    texture resized (bilinear) to the box; the table photo stays as it is."""

    texture_strength = 0.3
    texture_hw = (480, 640)

    def _overlay(self, rgb, foreground):
        composite = super()._overlay(rgb, foreground).float()
        for i, (texture, weight) in enumerate(self._episode_textures(rgb.device)):
            if not foreground[i].any():
                continue
            ymin, ymax, xmin, xmax = _mask_box(foreground[i, ..., 0])
            texture = texture.permute(2, 0, 1)[None].float()  # (1, 3, H, W)
            size = (ymax - ymin + 1, xmax - xmin + 1)
            texture = F.interpolate(texture, size=size, mode="bilinear", align_corners=False)[0]
            box = (i, slice(ymin, ymax + 1), slice(xmin, xmax + 1))
            blended = texture.permute(1, 2, 0) * weight + rgb[box].float() * (1.0 - weight)
            composite[box] = torch.where(foreground[box], blended, composite[box])
        return composite.clamp(0, 255).to(torch.uint8)


@_register("PutOnPlateInScene25VisionTexture05-v1")
class PutOnPlateInScene25VisionTexture05(PutOnPlateInScene25VisionTexture03):
    texture_strength = 0.5


@_register("PutOnPlateInScene25VisionWhole03-v1")
class PutOnPlateInScene25VisionWhole03(_TexturedScene):
    """The whole frame (photo included) becomes frame x (1 - w) + texture x w, the texture loaded at twice the
    camera's size and cropped to the camera's size from the centre of the robot-and-objects box."""

    texture_strength = 0.3
    texture_hw = (960, 1280)

    def _overlay(self, rgb, foreground):
        composite = super()._overlay(rgb, foreground).float()
        height, width = rgb.shape[1:3]
        for i, (texture, weight) in enumerate(self._episode_textures(rgb.device)):
            ymin, ymax, xmin, xmax = _mask_box(foreground[i, ..., 0])
            y0, x0 = min(max((ymin + ymax) // 2, 1), height - 1), min(max((xmin + xmax) // 2, 1), width - 1)
            crop = texture[y0 : y0 + height, x0 : x0 + width].float()
            composite[i] = composite[i] * (1 - weight) + crop * weight
        return composite.clamp(0, 255).to(torch.uint8)


@_register("PutOnPlateInScene25VisionWhole05-v1")
class PutOnPlateInScene25VisionWhole05(PutOnPlateInScene25VisionWhole03):
    texture_strength = 0.5


# -- semantic ---------------------------------------------------------------------------------------------------------
@_register("PutOnPlateInScene25Carrot-v1")
class PutOnPlateInScene25Carrot(PutOnPlateInScene25MainV3):
    """The objects of obj_set (test: the 9 unseen ones), the 16 training photos."""

    def _episode_fields(self):
        return [
            ("obj", *OBJECTS[self.obj_set]),
            ("plate", len(self.plate_names), 0),
            ("table", *SEEN),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]


@_register("PutOnPlateInScene25Plate-v1")
class PutOnPlateInScene25Plate(PutOnPlateInScene25MainV3):
    """All 17 plates of more_plate are built; obj_set picks the first (train), the other 16 (test) or any."""

    uses_all_plates = True

    def _episode_fields(self):
        return [
            ("obj", *SEEN),
            ("plate", *FIRST_OR_OTHERS[self.obj_set]),
            ("table", *SEEN),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]


@_register("PutOnPlateInScene25Instruct-v1")
class PutOnPlateInScene25Instruct(PutOnPlateInScene25MainV3):
    """The instruction of INSTRUCTION_TEMPLATES[template]: the Main task's (train), one of the 16 after it (test)."""

    def _episode_fields(self):
        return [
            ("obj", *SEEN),
            ("template", *FIRST_OR_OTHERS[self.obj_set]),
            ("plate", len(self.plate_names), 0),
            ("table", *SEEN),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]

    def get_language_instruction(self, **kwargs):
        return [
            INSTRUCTION_TEMPLATES[t].format(obj=obj, plate=plate)
            for t, (obj, plate) in zip(self.episode["template"].tolist(), self.drawn_names())
        ]


@_register("PutOnPlateInScene25MultiCarrot-v1")
class PutOnPlateInScene25MultiCarrot(PutOnPlateInScene25MainV3):
    """A second object of obj_set (a distractor, same yaw) at the third spot of a triple: objects more than 15 cm
    apart, each more than 7 cm from the plate (object z 0.95, plate 0.92, distractor 1.0)."""

    def _init_poses(self):
        return _triples(z=(0.95, 0.92, 1.0), min_gap=(0.070, 0.070, 0.15)), _main_yaws()

    def _episode_fields(self):
        n_obj, obj_offset = OBJECTS[self.obj_set]
        return [
            ("obj", n_obj, obj_offset),
            ("extra", n_obj - 1, 0),
            ("plate", len(self.plate_names), 0),
            ("table", *SEEN),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]

    def _decode_episode(self, episode_id):
        drawn = super()._decode_episode(episode_id)
        n_obj, obj_offset = OBJECTS[self.obj_set]
        # One of the other objects of the set. As in RLinf the shift starts from the object's index with its offset,
        # so with obj_set "test" one draw in 8 names the object itself, which then stands at the distractor's spot.
        drawn["extra"] = (drawn["obj"] + drawn["extra"] + 1) % n_obj + obj_offset
        return drawn

    def _layout(self, env_idx, xyz, quat):
        (objects, parked_x, placed), plates = super()._layout(env_idx, xyz, quat)
        placed = placed + [(self.episode["extra"][env_idx], xyz[:, 2], quat[:, 0])]
        return [(objects, parked_x, placed), plates]


@_register("PutOnPlateInScene25MultiPlate-v1")
class PutOnPlateInScene25MultiPlate(PutOnPlateInScene25MainV3):
    """A second plate (a distractor, unrotated) at the third spot of a triple: plates more than 15 cm apart, the object
    more than 7 cm from each (object z 1.0, plate 0.92, distractor 0.96). The target plate is of obj_set (as in
    Plate-v1); the distractor is any other plate (train, all) or another of the 16 test plates (test). All 21 photos."""

    uses_all_plates = True
    distractor_pool = {"train": 17, "test": 16, "all": 17}  # plates, from the set's first, the distractor is one of

    def _init_poses(self):
        return _triples(z=(1.0, 0.92, 0.96), min_gap=(0.070, 0.15, 0.070)), _main_yaws()

    def _episode_fields(self):
        return [
            ("obj", *SEEN),
            ("plate", *FIRST_OR_OTHERS[self.obj_set]),
            ("extra", self.distractor_pool[self.obj_set] - 1, 0),
            ("table", len(self.backgrounds), 0),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]

    def _decode_episode(self, episode_id):
        drawn = super()._decode_episode(episode_id)
        offset = FIRST_OR_OTHERS[self.obj_set][1]
        drawn["extra"] = (drawn["plate"] - offset + drawn["extra"] + 1) % self.distractor_pool[self.obj_set] + offset
        return drawn

    def _layout(self, env_idx, xyz, quat):
        objects, (plates, parked_x, placed) = super()._layout(env_idx, xyz, quat)
        placed = placed + [(self.episode["extra"][env_idx], xyz[:, 2], quat[:, 1])]
        return [objects, (plates, parked_x, placed)]


# -- execution --------------------------------------------------------------------------------------------------------
@_register("PutOnPlateInScene25Position-v1")
class PutOnPlateInScene25Position(PutOnPlateInScene25MainV3):
    """Placements (object and plate at z 0.95) and yaws of obj_set. train: the Main task's pairs on the 6 x 6 grid and
    yaws 0, 45, 90, 135 deg; test: pairs on the ring of 28 points one grid step outside it (an 8 x 8 grid's border)
    and yaws -22.5, -67.5, -112.5, -157.5 deg."""

    def _init_poses(self):
        seen = pair_placements(square_grid(np.linspace(0.0, 1.0, 6)), 0.95, 0.95)
        ring = square_grid(np.linspace(-0.2, 1.2, 8))
        ring = ring[np.isclose(ring, ring.min(0)).any(1) | np.isclose(ring, ring.max(0)).any(1)]
        unseen = pair_placements(ring, 0.95, 0.95)
        unseen_yaws = yaw_quats(-np.array([1, 3, 5, 7]) * np.pi / 8)
        self.pos_sets = {"train": (len(seen), 0), "test": (len(unseen), len(seen)), "all": (len(seen) + len(unseen), 0)}
        self.quat_sets = {"train": (4, 0), "test": (4, 4), "all": (8, 0)}
        return np.concatenate([seen, unseen]), np.concatenate([_main_yaws(), unseen_yaws])

    def _episode_fields(self):
        return [
            ("obj", *SEEN),
            ("plate", len(self.plate_names), 0),
            ("table", *SEEN),
            ("pos", *self.pos_sets[self.obj_set]),
            ("quat", *self.quat_sets[self.obj_set]),
        ]


def _joint_offsets() -> np.ndarray:
    """(N, 8) offsets added to the initial joint positions: none first, then every combination of waist, shoulder,
    elbow, forearm roll, wrist angle in {0, +-0.08, +-0.15} rad and wrist rotate in {0, +-0.3, +-0.6} rad whose
    shoulder + elbow stays within 0.25 rad; the fingers unchanged."""
    small, large = [-0.15, -0.08, 0.0, 0.08, 0.15], [-0.6, -0.3, 0.0, 0.3, 0.6]
    offsets = [q for q in itertools.product(*[small] * 5, large) if abs(q[1] + q[2]) <= 0.25]
    return np.concatenate([np.zeros((1, 8)), np.pad(np.asarray(offsets), ((0, 0), (0, 2)))])


@_register("PutOnPlateInScene25EEPose-v1")
class PutOnPlateInScene25EEPose(PutOnPlateInScene25MainV3):
    """The arm starts at the Bridge pose plus one of `_joint_offsets`: none (train), one of the others (test)."""

    def __init__(self, *args, **kwargs):
        self.joint_offsets = _joint_offsets()
        super().__init__(*args, **kwargs)

    def _episode_fields(self):
        n_offsets = len(self.joint_offsets)
        return [
            ("obj", *SEEN),
            ("ee_pose", *{"train": (1, 0), "test": (n_offsets - 1, 1), "all": (n_offsets, 0)}[self.obj_set]),
            ("plate", len(self.plate_names), 0),
            ("table", *SEEN),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]

    def _initial_qpos(self, env_idx):
        offsets = torch.as_tensor(self.joint_offsets, device=self.device)[self.episode["ee_pose"][env_idx]]
        return torch.as_tensor(self.initial_qpos, device=self.device) + offsets  # (b, 8)


@_register("PutOnPlateInScene25PositionChangeTo-v1")
class PutOnPlateInScene25PositionChangeTo(PutOnPlateInScene25MainV3):
    """With obj_set test or all, the object is moved to the third spot of its triple (as in MultiCarrot: more than
    15 cm from where it started, more than 7 cm from the plate) when the episode's 5th step is evaluated, so the policy
    sees it there from the 5th observation on; obj_set train keeps it where it is."""

    change_position_step = 5

    def _init_poses(self):
        return _triples(z=(0.95, 0.92, 1.0), min_gap=(0.070, 0.070, 0.15)), _main_yaws()

    def _episode_fields(self):
        return [
            ("obj", *SEEN),
            ("plate", len(self.plate_names), 0),
            ("table", *SEEN),
            ("pos", len(self.xyz_configs), 0),
            ("quat", len(self.quat_configs), 0),
        ]

    def evaluate(self):
        if self.obj_set != "train":
            move = self.elapsed_steps == self.change_position_step  # (N,)
            new_p = torch.as_tensor(self.xyz_configs, device=self.device)[self.episode["pos"], 2]  # (N, 3)
            new_q = torch.as_tensor(self.quat_configs, device=self.device)[self.episode["quat"], 0]  # (N, 4)
            for i, actor in enumerate(self.objects):
                here = (move & (self.episode["obj"] == i))[:, None]
                if here.any():
                    p, q = torch.where(here, new_p, actor.pose.p), torch.where(here, new_q, actor.pose.q)
                    actor.set_pose(Pose.create_from_pq(p=p, q=q))
        return super().evaluate()


OOD_ENV_IDS = {
    "vision": [
        "PutOnPlateInScene25VisionImage-v1",
        "PutOnPlateInScene25VisionTexture03-v1",
        "PutOnPlateInScene25VisionTexture05-v1",
        "PutOnPlateInScene25VisionWhole03-v1",
        "PutOnPlateInScene25VisionWhole05-v1",
    ],
    "semantic": [
        "PutOnPlateInScene25Carrot-v1",
        "PutOnPlateInScene25Plate-v1",
        "PutOnPlateInScene25Instruct-v1",
        "PutOnPlateInScene25MultiCarrot-v1",
        "PutOnPlateInScene25MultiPlate-v1",
    ],
    "execution": [
        "PutOnPlateInScene25Position-v1",
        "PutOnPlateInScene25EEPose-v1",
        "PutOnPlateInScene25PositionChangeTo-v1",
    ],
}
