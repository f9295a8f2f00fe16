"""InternVL text actions: the answer template, its prefix-constrained token layout, and the prompt.

The policy answers every control step with

    action: {x: -18mm, y: -35mm, z: -28mm, roll: 0 degrees, pitch: 0 degrees, yaw: 4 degrees, open: 1}

(the text-action format of the verl-fork GRPO anchor): millimetres and degrees of a pd_ee_delta_pose step, and the
gripper (1 open, 0 close). The prompt carries the instruction and the end-effector state in the same units.
grpo_internvl.py samples answers through this template and sft_internvl.py trains on it, so both live here.
"""

import math
import re

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor

MM_PER_M, DEG_PER_RAD = 1000.0, 57.3
EE_POS_LIMIT_M, EE_ROT_LIMIT_RAD = 0.1, 0.1  # Panda pd_ee_delta_pose bounds (ManiSkill3), normalised to [-1, 1]
POSE_FIELDS = (("x", "mm"), ("y", "mm"), ("z", "mm"), ("roll", " degrees"), ("pitch", " degrees"), ("yaw", " degrees"))


class ActionTemplate:
    """The action answer compiled for one tokenizer: forced token runs between free slots.

    Free slots are sign slots {" ", " -"}, number slots (one token "0".."999", or three digit tokens
    "0".."9" for tokenizers that split digits) and the gripper slot {"0", "1"}. A sampled free token
    is stored as its index in the slot's allowed set, so decoding the action is arithmetic on indices.
    """

    def __init__(self, tokenizer):
        def one_token(text: str) -> int:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1 or tokenizer.decode(ids) != text:
                raise ValueError(
                    f"--model-path: the tokenizer cannot express the action template: {text!r} is not one token "
                    f"(got {tokenizer.convert_ids_to_tokens(ids)})"
                )
            return ids[0]

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        sign = [one_token(" "), one_token(" -")]
        digits = [one_token(str(d)) for d in range(10)]
        if all(len(encode(str(n))) == 1 for n in range(1000)):
            self.digits_per_number, number = 1, [one_token(str(n)) for n in range(1000)]
        elif all(encode(f"{n:03d}") == [digits[int(c)] for c in f"{n:03d}"] for n in range(1000)):
            self.digits_per_number, number = 3, digits
        else:
            raise ValueError(
                "--model-path: the tokenizer cannot express the action template: integers 0..999 are neither "
                "single tokens nor sequences of single-digit tokens"
            )
        # Allowed sets, padded to a common width S: 0 sign, 1 number (or digit), 2 gripper.
        sets = [sign, number, digits[:2]]
        width = max(len(s) for s in sets)
        self.set_ids = torch.tensor([s + [s[0]] * (width - len(s)) for s in sets])  # (3, S)
        self.set_valid = torch.tensor([[i < len(s) for i in range(width)] for s in sets])  # (3, S)

        # Forced text between slots: "action: {x:" [sign][number] "mm, y:" ... " degrees, open: " [gripper] "}"
        texts, slots = [], []
        prefix = "action: {"
        for name, unit in POSE_FIELDS:
            texts += [prefix + f"{name}:"] + [""] * self.digits_per_number
            slots += [0] + [1] * self.digits_per_number
            prefix = f"{unit}, "
        texts += [prefix + "open: "]
        slots += [2]
        texts += ["}"]
        self.forced = [encode(t) for t in texts]  # forced[f] comes right before free slot f; forced[-1] is the tail
        self.free_set = torch.tensor(slots)  # (F,) allowed-set index of each free slot
        self.num_free = len(slots)
        lengths = [len(ids) + 1 for ids in self.forced[:-1]]  # each forced run is followed by its free token
        self.free_pos = torch.tensor(np.cumsum(lengths) - 1)  # (F,) position of each free token in the answer
        self.answer_len = sum(lengths) + len(self.forced[-1])

    def assemble(self, free_tokens: torch.Tensor) -> torch.Tensor:
        """free token ids (B, F) -> full answer ids (B, A) with the forced tokens in place."""
        batch = free_tokens.size(0)
        pieces = []
        for f in range(self.num_free):
            pieces += [torch.tensor(self.forced[f], dtype=torch.long).expand(batch, -1), free_tokens[:, f : f + 1]]
        pieces.append(torch.tensor(self.forced[-1], dtype=torch.long).expand(batch, -1))
        return torch.cat(pieces, dim=1)

    def to_env_action(self, choices: torch.Tensor) -> torch.Tensor:
        """Indices of the sampled tokens in their allowed sets (B, F) -> normalised pd_ee_delta_pose (B, 7)."""
        per_field = 1 + self.digits_per_number
        pose = choices[:, : 6 * per_field].view(-1, 6, per_field)  # (B, 6, sign + digits)
        place = 10 ** torch.arange(self.digits_per_number - 1, -1, -1)  # (D,) 100, 10, 1 or just 1
        magnitude = (pose[:, :, 1:] * place).sum(-1).float()  # (B, 6) in mm / degrees
        value = torch.where(pose[:, :, 0] == 1, -magnitude, magnitude)
        pos = (value[:, :3] / MM_PER_M).clamp(-EE_POS_LIMIT_M, EE_POS_LIMIT_M) / EE_POS_LIMIT_M
        rot = (value[:, 3:] / DEG_PER_RAD).clamp(-EE_ROT_LIMIT_RAD, EE_ROT_LIMIT_RAD) / EE_ROT_LIMIT_RAD
        gripper = torch.where(choices[:, -1:] == 1, 1.0, -1.0)  # open: 1 -> +1 (open), 0 -> -1 (close)
        return torch.cat([pos, rot, gripper], dim=1)

    def choices_from_action(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalised pd_ee_delta_pose (B, 7) -> the allowed-set indices (B, F) that write it (nearest integer mm and
        degrees, at most 999); the inverse of `to_env_action` up to that rounding. Supervised targets come from here."""
        value = torch.cat(
            [actions[:, :3] * EE_POS_LIMIT_M * MM_PER_M, actions[:, 3:6] * EE_ROT_LIMIT_RAD * DEG_PER_RAD], 1
        )
        magnitude = value.abs().round().clamp(max=999).long()  # (B, 6)
        place = 10 ** torch.arange(self.digits_per_number - 1, -1, -1)  # (D,)
        digits = magnitude[:, :, None] // place % (1000 if self.digits_per_number == 1 else 10)  # (B, 6, D)
        sign = ((value < 0) & (magnitude > 0)).long()[:, :, None]  # " -" only for a non-zero negative number
        gripper = (actions[:, 6:] > 0).long()  # > 0 is open (1), else close (0)
        return torch.cat([torch.cat([sign, digits], 2).flatten(1), gripper], 1)

    def answer_ids(self, choices: torch.Tensor) -> torch.Tensor:
        """Allowed-set indices (B, F) -> full answer token ids (B, A)."""
        tokens = self.set_ids[self.free_set][torch.arange(self.num_free), choices]  # (B, F) vocabulary ids
        return self.assemble(tokens)


ACTION_PATTERN = re.compile(
    r"action: \{x: (-?\d+)mm, y: (-?\d+)mm, z: (-?\d+)mm, roll: (-?\d+) degrees, "
    r"pitch: (-?\d+) degrees, yaw: (-?\d+) degrees, open: ([01])\}"
)


def parse_action_text(text: str) -> torch.Tensor:
    """Answer text -> normalised pd_ee_delta_pose (7,); the reference decoder the tests compare against."""
    match = ACTION_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"not an action: {text!r}")
    v = [float(g) for g in match.groups()]
    pos = [max(-EE_POS_LIMIT_M, min(EE_POS_LIMIT_M, x / MM_PER_M)) / EE_POS_LIMIT_M for x in v[:3]]
    rot = [max(-EE_ROT_LIMIT_RAD, min(EE_ROT_LIMIT_RAD, x / DEG_PER_RAD)) / EE_ROT_LIMIT_RAD for x in v[3:6]]
    return torch.tensor(pos + rot + [1.0 if v[6] > 0.5 else -1.0])


def state_text(tcp_pose: torch.Tensor) -> str:
    """End-effector pose (7,) xyz + quaternion wxyz -> text in the action's units (mm, degrees)."""
    x, y, z, qw, qx, qy, qz = tcp_pose.tolist()
    roll = math.atan2(2 * (qw * qx + qy * qz), 1 - 2 * (qx * qx + qy * qy))
    pitch = math.asin(max(-1.0, min(1.0, 2 * (qw * qy - qz * qx))))
    yaw = math.atan2(2 * (qw * qz + qx * qy), 1 - 2 * (qy * qy + qz * qz))
    values = [v * MM_PER_M for v in (x, y, z)] + [v * DEG_PER_RAD for v in (roll, pitch, yaw)]
    return ", ".join(f"{name}: {round(v)}{unit}" for (name, unit), v in zip(POSE_FIELDS, values))


def build_inputs(processor, instructions: list[str], rgb: torch.Tensor, tcp_pose: torch.Tensor, device):
    """rgb (B, H, W, 3) uint8, tcp_pose (B, 7) -> model inputs (left-padded ids, mask, pixel_values)."""
    prompts = []
    for instruction, pose in zip(instructions, tcp_pose):
        text = f"{instruction}\nEnd-effector state: {{{state_text(pose)}}}\nWhat action should the robot take?"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    inputs = processor(
        text=prompts, images=list(rgb.permute(0, 3, 1, 2)), crop_to_patches=False, padding=True, return_tensors="pt"
    )
    return inputs.to(device)


def load_processor_and_template(model_path: str):
    """Read only the config and tokenizer files: fail fast on a checkpoint that is not InternVL."""
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)  # never a prompt on a terminal
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--model-path {model_path!r} is not a transformers-native checkpoint (use an InternVL `-hf` one, e.g. "
            f"OpenGVLab/InternVL3-1B-hf): {e}"
        ) from e
    if config.model_type != "internvl":
        raise ValueError(
            f"--model-path {model_path!r} has model_type {config.model_type!r}, not 'internvl': use a "
            "transformers-native InternVL checkpoint, e.g. OpenGVLab/InternVL3-1B-hf"
        )
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=False)
    return processor, ActionTemplate(processor.tokenizer)
