"""V-JEPA 2 video embeddings for SRPO's world-model progress reward (the reward itself is in srpo_openvla_oft.py).

Each trajectory's agentview video -> one embedding, as siiRL's SRPO computes it: 64 frames picked with linspace
(a shorter video is tiled cyclically), short side resized to 256/224 of the encoder size, center-cropped to the
encoder size, ImageNet mean/std, encoder output averaged over all tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def subsample_frame_indices(num_video_frames: int, num_frames: int = 64) -> np.ndarray:
    """linspace over a long video; a short one is tiled cyclically (0, 1, .., T-1, 0, 1, ..)."""
    if num_video_frames >= num_frames:
        return np.linspace(0, num_video_frames - 1, num=num_frames).astype(np.int64)
    return np.arange(num_frames) % num_video_frames


def preprocess_video(frames: np.ndarray, size: int, num_frames: int = 64) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (num_frames, 3, size, size) float32, ImageNet-normalised."""
    video = torch.from_numpy(frames[subsample_frame_indices(len(frames), num_frames)])
    video = video.permute(0, 3, 1, 2).float() / 255.0  # (F, 3, H, W)
    short_side = int(256.0 / 224 * size)
    h, w = video.shape[-2:]
    scale = short_side / min(h, w)
    new_h, new_w = max(short_side, round(h * scale)), max(short_side, round(w * scale))
    video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    video = video[:, :, top : top + size, left : left + size]  # (F, 3, size, size)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (video - mean) / std


def check_world_model(path: str, flag: str = "--world-model-path") -> None:
    """Read only config.json (local or hub) and fail clearly unless it is a V-JEPA 2 model."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{flag} {path!r}: no V-JEPA 2 checkpoint there ({e})") from e
    if config.get("model_type") != "vjepa2":
        raise ValueError(
            f"{flag} {path!r} is a {config.get('model_type')!r} model, not V-JEPA 2 "
            "(e.g. facebook/vjepa2-vitg-fpc64-384)"
        )


class VideoEmbedder:
    """V-JEPA 2 encoder (transformers `VJEPA2Model`) turning videos into mean-pooled embeddings.

    path: a hub id (facebook/vjepa2-vitg-fpc64-384, facebook/vjepa2-vitl-fpc64-256) or a local
    save_pretrained directory. offload: keep the weights on the CPU between calls.
    """

    def __init__(
        self,
        path: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        num_frames: int = 64,
        offload: bool = False,
    ):
        from transformers import VJEPA2Model

        check_world_model(path)
        self.model = VJEPA2Model.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype, self.num_frames, self.offload = device, dtype, num_frames, offload
        self.size = self.model.config.crop_size
        self.model.to("cpu" if offload else device)

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray], batch_size: int = 8) -> torch.Tensor:
        """[(T_i, H, W, 3) uint8] -> (N, hidden) float32 on the CPU."""
        if self.offload:
            self.model.to(self.device)
        embeddings = []
        for start in range(0, len(videos), batch_size):
            clips = torch.stack(
                [preprocess_video(v, self.size, self.num_frames) for v in videos[start : start + batch_size]]
            )
            clips = clips.to(self.device, self.dtype)  # (B, F, 3, size, size)
            tokens = self.model(pixel_values_videos=clips, skip_predictor=True).last_hidden_state  # (B, L, hidden)
            embeddings.append(tokens.float().mean(dim=1).cpu())
        if self.offload:
            self.model.to("cpu")
        return torch.cat(embeddings)
