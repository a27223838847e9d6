"""The process group: torchrun's env:// rendezvous, or a one-process group for plain `python`.

The backend follows the device: NCCL with CUDA, Gloo on CPU (`cpu.py`), so a laptop and a
cluster run the same code.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .cpu import distributed_backend

T = TypeVar("T")


def init_distributed(timeout_minutes: int = 30) -> None:
    """Join torchrun's group (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), or make a
    one-process group when started with plain `python`, so the same code runs both ways."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        # One process: an in-memory store, no TCP port (a port picked free here could be taken by
        # another job before it is bound, and a MASTER_PORT left in the environment may be in use).
        # Nothing is written to the environment, so a later init in this process (a notebook after
        # Trainer.close) is one-process again, and a torchrun started from it inherits nothing.
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(backend=distributed_backend(), store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=distributed_backend(), timeout=timeout)


def from_rank0(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 and its (picklable) result on every rank; collective, so every
    rank calls it. For decisions the ranks must share: which checkpoint to resume, whether a
    rank-0-only file step failed, a new run's id."""
    value = compute() if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value
