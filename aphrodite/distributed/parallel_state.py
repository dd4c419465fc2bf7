"""Who this process is within its tensor-parallel group.

Model layers ask here for their shard (rank) and shard count (size) when they build their
parameters. A single process is rank 0 of 1; the executor that starts several processes calls
``set_tensor_model_parallel`` in each before the model is built.
"""
from __future__ import annotations

from typing import Any

_TP_RANK = 0
_TP_SIZE = 1
_TP_GROUP: Any = None


def set_tensor_model_parallel(rank: int, size: int, group: Any = None) -> None:
    """Record this process's tensor-parallel rank, group size and torch.distributed group."""
    global _TP_RANK, _TP_SIZE, _TP_GROUP
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"invalid tensor-parallel rank {rank} of size {size}")
    _TP_RANK, _TP_SIZE, _TP_GROUP = rank, size, group


def get_tensor_model_parallel_rank() -> int:
    return _TP_RANK


def get_tensor_model_parallel_world_size() -> int:
    return _TP_SIZE


def get_tensor_model_parallel_group() -> Any:
    """The torch.distributed process group of the TP ranks (None means the default group)."""
    return _TP_GROUP
