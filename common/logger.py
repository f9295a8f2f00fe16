"""TensorBoard logging (rank 0 only) and mp4 videos; with --track, the same scalars, the hyperparameters and the
videos mirrored to Weights & Biases (an optional dependency: pip install wandb)."""

import dataclasses
import importlib.util
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


def video_file(tag: str, step: int) -> str:
    """Where `Logger.video` writes `tag` at `step`, relative to the run directory."""
    return os.path.join("videos", f"{tag.replace('/', '_')}_step{step}.mp4")


def check_tracking(args) -> None:
    """--track needs the wandb package: say so before any expensive work."""
    if getattr(args, "track", False) and importlib.util.find_spec("wandb") is None:
        raise ValueError("--track logs to Weights & Biases, which is not installed: pip install wandb, or drop --track")


class Logger:
    def __init__(self, log_dir: str, args, enabled: bool = True):
        self.enabled, self.log_dir = enabled, log_dir
        self.writer = self.wandb = None
        if enabled:
            self.writer = SummaryWriter(log_dir)
            rows = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
        if enabled and getattr(args, "track", False):
            import wandb  # WANDB_MODE=offline on a node without network, then `wandb sync` the run's wandb/ folder

            self.wandb = wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                name=os.path.basename(log_dir),  # {exp_name}__s{seed}; a resumed or evaluation launch is a new W&B run
                group=os.path.basename(log_dir),
                job_type="eval" if args.eval_only else "train",
                config=dataclasses.asdict(args),
                dir=log_dir,
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def video(self, tag: str, frames: np.ndarray, step: int, fps: int = 10) -> None:
        """Write `log_dir/videos/{tag}_step{step}.mp4` (frames (T, H, W, 3) uint8)."""
        if self.writer is not None:
            path = os.path.join(self.log_dir, video_file(tag, step))
            save_video(path, frames, fps)
            if self.wandb is not None:
                import wandb

                self.wandb.log({tag: wandb.Video(path, format="mp4")}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
