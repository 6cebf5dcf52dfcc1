"""torchrun integration: process-group set-up, slice sharding and all-reduce of mixture statistics.

``admanomaly train`` runs unchanged under ``torchrun --nproc_per_node=N``: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, :func:`init_from_environment` joins the group (``nccl`` on GPUs,
``gloo`` on CPUs) and the trainer wraps its networks in DistributedDataParallel.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .device import resolve_device
from .errors import DeviceError


@dataclass(frozen=True)
class DistributedContext:
    """Rank and size of this process's group (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, models and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistributedContext()


def init_from_environment(device: str = "auto") -> tuple[DistributedContext, torch.device]:
    """Join the process group torchrun describes in the environment, or run single-process.

    Returns the context and this rank's device (``cuda:LOCAL_RANK`` with nccl)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS, resolve_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank, world_size, local_rank, backend), torch_device


def shutdown(context: DistributedContext) -> None:
    """Leave the process group if this process joined one."""
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


def shard_for_training(order: np.ndarray, context: DistributedContext) -> np.ndarray:
    """This rank's share of a (shuffled) slice order, padded by wrap-around so that every rank runs
    the same number of steps (DistributedSampler semantics; DDP needs equal step counts)."""
    if not context.active:
        return order
    per_rank = -(-len(order) // context.world_size)
    padded = np.resize(order, per_rank * context.world_size)
    return padded[context.rank :: context.world_size]


def shard_exact(count: int, context: DistributedContext) -> np.ndarray:
    """Indices ``0..count-1`` owned by this rank, each owned by exactly one rank (for statistics)."""
    return np.arange(context.rank, count, context.world_size)


def all_reduce_sum_(tensors: list[torch.Tensor], context: DistributedContext) -> None:
    """Sum tensors across ranks in place (no-op for a single process)."""
    if not context.active:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if context.active:
        dist.barrier()
