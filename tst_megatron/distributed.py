"""The process group: torchrun's env:// rendezvous, or a one-process group for plain `python`.

The backend follows the device: NCCL with CUDA, Gloo on CPU (`cpu.py`), so a laptop and a
cluster run the same code.
"""
from __future__ import annotations

import datetime
import os
import socket
from contextlib import closing

import torch
import torch.distributed as dist

from .cpu import distributed_backend


def free_port() -> int:
    """A TCP port nobody listens on now (for a one-process rendezvous on this host)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    """Join torchrun's group (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), or make a
    one-process group when started with plain `python`, so the same code runs both ways."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=distributed_backend(), timeout=datetime.timedelta(minutes=timeout_minutes))
