"""Data and sharded parallelism as functions applied to a single-device model.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...); gloo on CPU, NCCL on GPU.
The model class never learns about any of this (docs/DESIGN.md "Models").

* :func:`apply_ddp`: ``DistributedDataParallel`` replicates the model and all-reduces gradients
  during backward (Li et al. 2020, "PyTorch Distributed").
* :func:`apply_fsdp`: FSDP2 ``fully_shard`` (per-parameter DTensor sharding) on every Transformer
  block, then on the root: parameters, gradients and optimizer state are sharded across ranks and
  each block's parameters are all-gathered just before use (Zhao et al. 2023, "PyTorch FSDP").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by ``torchrun``; a no-op single-process ``DistInfo`` otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local >= torch.cuda.device_count():
        from corelm.errors import CorelmError

        raise CorelmError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most "
                          "one process per GPU (--nproc-per-node), or train on CPU with --device cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The Transformer blocks: ``transformer.h`` (gpt2), ``model.layers`` / ``layers`` (llama),
    ``encoder.layer`` (bert); else the largest ``nn.ModuleList`` in the model."""
    for path in ("transformer.h", "model.layers", "layers", "encoder.layer"):
        mod: nn.Module | None = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks")
    return max(lists, key=len)


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` (returns the wrapper; keep the original for saving)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def apply_fsdp(model: nn.Module, info: DistInfo, reshard_after_forward: bool = True) -> nn.Module:
    """Shard every block, then the root (embeddings, final norm, head), with FSDP2 ``fully_shard``.

    ``fully_shard`` changes the modules in place (parameters become DTensor shards), so the returned
    model is the same object and keeps its parameter names.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (identity in a single process)."""
    if not info.distributed:
        return values
    import torch.distributed as dist

    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size
