"""FSDP2 for full fine-tuning: parameters, gradients and AdamW state sharded over ranks (`torch.distributed.fsdp`).

    model = shard_model(model, reduce="sum")    # every decoder layer and ViT block, then the root, one group each
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)   # AFTER sharding
    with gathered_params(model):                # rollout/eval: one all-gather per group, then no collectives
        ...
    loss.backward(); clip_grad_norm_(params, max_norm); optimizer.step()
    state = full_state_dict(model)              # collective; rank 0 gets every tensor on CPU, other ranks {}

What FSDP2 keeps per rank (MixedPrecisionPolicy on GPU: bf16 compute, fp32 gradient reduction): the fp32 shard of
every parameter, its fp32 gradient shard and the two AdamW moments (16 bytes per parameter / world size), plus the
bf16 parameters of the layers being computed (all-gathered before a group's forward and backward, freed after).

Every rank must run the same sequence of sharded forwards and backwards (each one all-gathers and reduce-scatters):
pad uneven micro-batch lists with `even_micro_batches`, and wrap rollouts whose length differs per rank (early exits,
episodes ending at different steps) in `gathered_params`.
"""

import contextlib
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from common.dist import is_dist

# One FSDP group per module of these classes: transformers' decoder and vision layers, timm's ViT `Block`
# (the DINOv2 and SigLIP featurizers of OpenVLA). Everything else (embeddings, LM head, norms, projector, value
# head) goes to the root's group.
LAYER_CLASSES = frozenset(
    {"LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "InternVLVisionLayer", "Block"}
)
FSDP_MODES = ("auto", "on", "off")


def use_fsdp(mode: str, lora_rank: int, world_size: int, flag: str = "--fsdp") -> bool:
    """auto: full fine-tuning (lora_rank 0) on more than one rank; on/off: always/never (on with LoRA is refused:
    the frozen base is replicated and the adapters are tiny, so DDP or summed gradients do better)."""
    if mode not in FSDP_MODES:
        raise ValueError(f"{flag} must be one of {FSDP_MODES}, got {mode!r}")
    if mode == "on" and lora_rank > 0:
        raise ValueError(f"{flag} on needs full fine-tuning (--lora-rank 0), got --lora-rank {lora_rank}")
    return mode == "on" or (mode == "auto" and lora_rank == 0 and world_size > 1)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(
    model: nn.Module,
    reduce: str = "mean",
    layer_classes: Iterable[str] = LAYER_CLASSES,
    forward_methods: Iterable[str] = (),
    device: Optional[torch.device] = None,
) -> nn.Module:
    """Shard `model` in place over all ranks (a 1-rank world works too) and return it.

    Call it after the weights are loaded and `requires_grad` is set, and build the optimizer afterwards: sharding
    replaces every parameter by a DTensor shard. Rank 0's weights are broadcast first (FSDP shards each rank's own
    copy). reduce: "mean" averages gradients over ranks (DDP's rule: the per-rank loss is a mean over the rank's
    samples); "sum" sums them (the per-rank loss is already divided by a global count). forward_methods: methods
    other than `forward` that the scripts call on the root (e.g. PPO's `act`); they get FSDP's forward hooks."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    world = dist.get_world_size() if is_dist() else 1
    if not is_dist():  # a 1-process world: FSDP still needs a process group
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (world,))
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # fp32 everywhere
    _broadcast_from_rank0(model, device)
    layer_classes = set(layer_classes)
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes and m is not model]
    for layer in reversed(layers):  # bottom-up: a module's group takes the parameters no inner group took
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # the root is needed again first
    set_gradient_reduction(model, reduce)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def _broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Rank 0's parameters and buffers to every rank, one tensor at a time through `device` (NCCL needs CUDA tensors
    and the model may still be on the CPU: loading there and letting fully_shard move only the shards to the GPU
    avoids a full fp32 copy on the GPU)."""
    if not is_dist() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            staged = tensor.data.to(device)
            dist.broadcast(staged, 0)
            if staged is not tensor.data:
                tensor.data.copy_(staged)


def set_gradient_reduction(model: nn.Module, reduce: str) -> None:
    """Gradients reduce-scattered as a plain SUM, then divided by the world size ("mean") or not ("sum").

    FSDP's default is an AVG reduce-scatter; `set_gradient_divide_factor(1.0)` alone would use NCCL's PREMUL_SUM,
    which gloo lacks ("Cannot use ReduceOp.PREMUL_SUM with Gloo"); forcing SUM works on both backends. Both
    setters act on one module's groups only, hence the loop."""
    world = dist.get_world_size() if is_dist() else 1
    for module in fsdp_modules(model):
        module.set_force_sum_reduction_for_comms(True)
        module.set_gradient_divide_factor(1.0 if reduce == "sum" else float(world))


@contextlib.contextmanager
def gathered_params(model: nn.Module) -> Iterator[None]:
    """Hold every group's full (bf16 on GPU) parameters for the duration: all-gathered once on entry, freed on exit.

    Inside, forwards run no collectives, so ranks may run different numbers of them (rollouts that stop early,
    bootstrap values for some envs only, 7 one-token decodes per action). Costs one full bf16 copy of the model per
    GPU (15 GB for a 7.5B model). For inference only (under torch.no_grad). A no-op for an unsharded model."""
    modules = fsdp_modules(model)
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)


def even_micro_batches(micro_batches: list, filler) -> list[tuple[object, float]]:
    """Pad this rank's micro-batches to the largest count over ranks with (filler, 0.0); real ones get weight 1.0.

    Under FSDP every rank must run the same number of forward/backward passes. Multiply the loss by the weight:
    a padding pass (filler = any valid sample) then contributes zero gradient but still joins the collectives."""
    count = torch.tensor([len(micro_batches)], dtype=torch.int64)
    if is_dist():
        if dist.get_backend() == "nccl":
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return [(m, 1.0) for m in micro_batches] + [(filler, 0.0)] * (int(count.item()) - len(micro_batches))


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (it handles DTensor gradients: the norm is reduced over the shards), returning
    the global pre-clip norm as a plain tensor on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _options(**kwargs) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: rank 0 gets every parameter and buffer gathered on CPU, keyed as in the unwrapped model
    (fully_shard does not rename); other ranks get {}."""
    return get_model_state_dict(model, options=_options())


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: rank 0 gets the optimizer state gathered on CPU, keyed by parameter name; other ranks get {}."""
    return get_optimizer_state_dict(model, optimizer, options=_options())


def _containers_copied(x):
    """A copy of nested dicts/lists sharing the tensors: the loaders below replace the values of what they are given."""
    if isinstance(x, dict):
        return {k: _containers_copied(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_containers_copied(v) for v in x]
    return x


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
    """Collective: copy a full state dict into the sharded model. from_rank0: only rank 0 passes it (the others
    pass {}) and it is broadcast; otherwise every rank passes the same full dict and keeps its own shard."""
    set_model_state_dict(model, _containers_copied(state), options=_options(broadcast_from_rank0=from_rank0))


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, from_rank0: bool = False
) -> None:
    """Collective: restore the optimizer from `full_optimizer_state_dict`'s output (see load_full_state_dict)."""
    options = _options(broadcast_from_rank0=from_rank0)
    set_optimizer_state_dict(model, optimizer, _containers_copied(state), options=options)


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` with the prefix removed (e.g. "vla." of PPO's Agent -> the OpenVLA keys)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
