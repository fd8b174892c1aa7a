"""Which process of a torchrun job this is: the one rank helper of training and sample-many."""
from __future__ import annotations

import os

import torch.distributed as dist

from bigr_engine.errors import BigrError


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank): from torch.distributed when a process group is up, else from torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK), else (0, 1, 0)."""
    try:
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), local
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise BigrError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun or unset them") from None
    if world < 1 or not 0 <= rank < world:
        raise BigrError(f"RANK={rank} must be in 0..WORLD_SIZE-1 with WORLD_SIZE={world} >= 1; launch with torchrun")
    return rank, world, local


def is_main_process() -> bool:
    return process_rank()[0] == 0
