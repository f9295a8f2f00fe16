"""TensorBoard logging (rank 0 only) and mp4 videos."""

import dataclasses
import os

import imageio.v2 as imageio
import numpy as np
from torch.utils.tensorboard import SummaryWriter


def is_due(iteration: int, interval: int, total_iterations: int) -> bool:
    """Evaluation and checkpoint schedule of every script: every `interval` iterations and after the last one;
    interval 0 = only after the last one."""
    return iteration == total_iterations or (interval > 0 and iteration % interval == 0)


def save_video(path: str, frames: np.ndarray, fps: int = 10) -> None:
    """frames: (T, H, W, 3) uint8."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)


class Logger:
    def __init__(self, log_dir: str, args, enabled: bool = True):
        self.enabled, self.log_dir = enabled, log_dir
        self.writer = None
        if enabled:
            self.writer = SummaryWriter(log_dir)
            rows = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def video(self, tag: str, frames: np.ndarray, step: int, fps: int = 10) -> None:
        """Write `log_dir/videos/{tag}_step{step}.mp4` (frames (T, H, W, 3) uint8)."""
        if self.writer is not None:
            save_video(os.path.join(self.log_dir, "videos", f"{tag.replace('/', '_')}_step{step}.mp4"), frames, fps)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
