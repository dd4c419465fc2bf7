"""Collectives over the tensor-parallel group; free no-ops when it has one member."""
from __future__ import annotations

import torch

from aphrodite.distributed.parallel_state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_world_size,
)


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` across TP ranks (in place when there are several) and return it."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    torch.distributed.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's ``x`` along ``dim`` (rank order)."""
    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)
