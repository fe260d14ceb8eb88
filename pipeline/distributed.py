"""Data-parallel training under ``torchrun`` (DistributedDataParallel), CPU (gloo) or CUDA (nccl).

``torchrun --nproc_per_node N $(which latprune) run ...`` starts N processes; :func:`init_from_env`
joins them into a process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...). Inside :func:`~latprune.pipeline.train.train` every global batch is drawn
from the same seeded stream on every rank and each rank trains on its slice of it, so the
averaged gradient is the global batch's; the model is wrapped in DDP for the steps and re-wrapped
after every removal (torch-pruning replaces the parameters DDP registered). Pruning decisions are
computed on rank 0 and broadcast, so every rank removes the same channels. Rank 0 alone profiles,
plans, writes checkpoints and artifacts, exports and times; the other ranks wait at barriers and
read rank 0's files (one machine or a shared file system).

Without torchrun (``WORLD_SIZE`` unset or 1) every helper here is a no-op for one process.

Verified here only on the CPU with gloo (2 processes, ``tests/pipeline/test_distributed.py`` and a
torchrun CLI run). The CUDA path (nccl, ``device_ids`` in :func:`wrap`) is written against the
documented API but has never run: no GPU on the build or CI machines.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, TypeVar

import torch
from torch import nn

__all__ = ["world_size", "rank", "is_main", "init_from_env", "barrier", "broadcast", "on_main", "main_first", "wrap",
           "rewrap_ddp", "sync_buffers", "shard", "describe"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join torchrun's process group if this process was started by torchrun; True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    d = torch.distributed
    if not d.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        d.init_process_group(backend=backend)
        log.info("distributed: rank %d of %d (%s)", d.get_rank(), d.get_world_size(), backend)
    return True


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` as computed on rank ``src``, on every rank (any picklable object)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Compute on rank 0, broadcast the result: one decision for all ranks."""
    return broadcast(fn() if is_main() else None)


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first (it measures and writes caches/artifacts), then on the other ranks
    (which find rank 0's files and reuse them)."""
    if not is_main():
        barrier()
    out = fn()
    if is_main():
        barrier()
    return out


def wrap(model: nn.Module) -> nn.Module:
    """The model as the training step sees it: DDP around it when distributed."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def rewrap_ddp(ddp: nn.Module, **kwargs: Any) -> nn.Module:
    """A new DistributedDataParallel around ``ddp.module`` after a removal replaced its parameters
    (the old wrapper's buckets and hooks hold the removed ones), with the old wrapper's devices,
    process group, ``find_unused_parameters`` and ``gradient_as_bucket_view``; ``kwargs`` override
    or add DDP's other arguments. Every rank calls it after the same ``pruner.step(optimizer)``::

        pruner.step(optimizer)
        model = latprune.rewrap_ddp(model)

    Not a DDP wrapper (one process): returned as it is."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp, DistributedDataParallel):
        return ddp
    kw = {"device_ids": ddp.device_ids, "output_device": ddp.output_device, "dim": ddp.dim,
          "process_group": ddp.process_group, "find_unused_parameters": ddp.find_unused_parameters,
          "gradient_as_bucket_view": ddp.gradient_as_bucket_view} | kwargs
    return DistributedDataParallel(ddp.module, **kw)


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics). DDP broadcasts them at the start of
    each forward, so after the last step each rank holds its own shard's update; this ends training
    with one model everywhere."""
    if world_size() > 1:
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a global batch (every rank drew the same one)."""
    n, r = world_size(), rank()
    return (x, y) if n == 1 else (x[r::n], y[r::n])


def describe() -> dict[str, Any]:
    return {"world_size": world_size(), "backend": torch.distributed.get_backend() if world_size() > 1 else None}
