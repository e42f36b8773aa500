"""Multi-process helpers: torchrun's environment, the process group, rank-0-only work, shards.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per CPU share)
and tells each its place through environment variables: ``RANK`` (0..WORLD_SIZE-1 over all
nodes), ``LOCAL_RANK`` (0..nproc_per_node-1 on this node), ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. Without them a script is one process and every helper here answers for a world
of one, so the same code runs with and without the launcher and needs no flag.

The process group uses NCCL when the processes drive GPUs and gloo otherwise (CPU training, tests).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched() -> bool:
    """True when a launcher (torchrun, or a SLURM script exporting the same names) set RANK/WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank from the environment (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    """The number of processes from the environment (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its node (its GPU index), 0 without a launcher."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """The global rank: from the process group when there is one, else from the environment."""
    return dist.get_rank() if is_initialized() else env_rank()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else env_world_size()


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0; the only one without a launcher)."""
    return rank() == 0


def backend_for(use_cuda: bool) -> str:
    """``nccl`` for GPU processes (when built in), ``gloo`` otherwise."""
    return "nccl" if use_cuda and dist.is_nccl_available() else "gloo"


def init(use_cuda: bool, timeout_s: float = 1800.0) -> bool:
    """Join the process group when launched by torchrun (no-op otherwise, or when already joined).

    On CUDA each process takes GPU ``LOCAL_RANK`` (set here, so NCCL and ``cuda`` default to it).

    Returns:
        True when this process is part of a group of more than one.
    """
    if not launched() or env_world_size() < 2 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend_for(use_cuda), timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank tears down while another still talks)."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_slice(items: Sequence[T], index: int | None = None, count: int | None = None) -> list[T]:
    """Items ``index, index + count, ...`` of ``items``: this rank's share by default.

    Round-robin, so the shares of ranks 0..count-1 are disjoint and together are ``items``.
    """
    index = rank() if index is None else index
    count = world_size() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"rank {index} is not in 0..{count - 1}")
    return list(items[index::count])
