"""torch.distributed in a few lines: the same script runs under `torchrun` or plain `python` (world size 1)."""

import contextlib
import datetime
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_dist(timeout_s: float = 300.0) -> Dist:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); otherwise a 1-process world.

    timeout_s (--dist-timeout-s): how long a collective waits for the other ranks. When a rank dies or hangs, the
    others raise after this long instead of PyTorch's default 10 minutes (NCCL) or 30 (gloo), and the message names
    this rank, the flag and where it waited; torchrun then stops the whole job (and restarts it with --max-restarts)."""
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout-s must be > 0 seconds, got {timeout_s}")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun keeps one key-value store for every attempt of a job, so after a --max-restarts relaunch the
        # previous attempt's keys (the dead ranks' addresses) are still in it, and a rank that reads one before the
        # new value lands keeps dialling a closed port until the timeout. Each attempt gets keys of its own.
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"attempt_{attempt}", store),
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
            timeout=timeout,
        )
        sys.excepthook = _name_collective_timeouts(sys.excepthook, rank, timeout_s)
    return Dist(rank, local_rank, world_size, device)


def _name_collective_timeouts(excepthook, rank: int, timeout_s: float):
    """An uncaught collective timeout gets one plain line first: this rank, the flag, and the project code that was
    waiting (the innermost frame of the scripts or common/)."""

    def hook(kind, error, tb):
        text = f"{kind.__name__}: {error}".lower()
        if isinstance(error, (RuntimeError, dist.DistError)) and ("timed out" in text or "timeout" in text):
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            ours = [f for f in traceback.extract_tb(tb) if os.path.abspath(f.filename).startswith(root)]
            where = f"{os.path.relpath(ours[-1].filename, root)}:{ours[-1].lineno} ({ours[-1].line})" if ours else "?"
            print(
                f"rank {rank}: a collective got no answer from another rank within --dist-timeout-s {timeout_s:g} s, "
                f"waiting at {where}. Another rank died or hangs (look at its log first: an error, an OOM, a stuck "
                f"env worker); this job stops, and with torchrun --max-restarts and --resume auto it restarts from "
                f"the last checkpoint.",
                file=sys.stderr,
                flush=True,
            )
        excepthook(kind, error, tb)

    return hook


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return not is_dist() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Average each scalar over ranks (every rank must pass the same keys in the same order)."""
    if not is_dist() or not metrics:
        return dict(metrics)
    keys = list(metrics)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=backend_device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a 1-process world)."""
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks (a no-op in a 1-process world); the tensor is moved to the backend's device."""
    if is_dist():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        reduced = tensor.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        tensor.copy_(reduced)
    return tensor


def any_rank(flag) -> bool:
    """True on every rank when `flag` (a bool or a 0-d tensor) is true on at least one rank."""
    return bool(all_reduce_max_(torch.as_tensor(flag, dtype=torch.float32).reshape(1).clone()).item())


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally-shaped tensor along dim 0, in rank order; returned on the CPU."""
    if not is_dist():
        return tensor.cpu()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    parts = [torch.empty_like(tensor, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.to(device))
    return torch.cat(parts).cpu()


def global_mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of the values of `x` over every rank."""
    device = "cuda" if is_dist() and dist.get_backend() == "nccl" else "cpu"
    x = x.detach().double().flatten()
    moments = all_reduce_sum_(torch.stack([x.sum(), (x**2).sum(), torch.tensor(float(x.numel()))]).to(device)).cpu()
    mean = moments[0] / moments[2]
    return mean.item(), (moments[1] / moments[2] - mean**2).clamp(min=0).sqrt().item()


def sum_gradients_(params: list[torch.Tensor]) -> None:
    """Sum (not average) gradients over ranks, for losses already divided by a global count (a token-mean over all
    ranks). A parameter without a gradient on this rank (no samples kept) contributes zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce_sum_(p.grad)


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank, so all ranks start from identical weights."""
    if not is_dist():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def check_in_sync(params: list[torch.Tensor]) -> None:
    """Raise if the ranks' copies of `params` differ (a cheap fingerprint: one all-gather of a scalar per rank)."""
    if not is_dist():
        return
    fingerprint = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    if dist.get_backend() == "nccl":
        fingerprint = fingerprint.cuda()
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(
            f"ranks hold different weights after the update: fingerprints {[g.item() for g in gathered]}"
        )


def bf16_autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU (when enabled); a no-op context on the CPU, where everything stays float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attn_implementation(device: torch.device) -> str:
    """flash-attention 2 on a GPU when the package is installed, else PyTorch SDPA."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"
