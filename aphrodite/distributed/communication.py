"""Collectives over the tensor-parallel group and point-to-point sends between pipeline stages.

TP collectives are free no-ops with one rank. The all-reduce goes to the custom one-shot
all-reduce over CUDA IPC buffers when one is set up and the message is small enough for it
(decode: a few KB per layer), and to torch.distributed (NCCL / gloo) otherwise.
"""
from __future__ import annotations

from typing import Any

import torch

from aphrodite.distributed.parallel_state import (
    get_backend,
    get_next_pp_world_rank,
    get_pp_group,
    get_pp_size,
    get_prev_pp_world_rank,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_world_size,
    is_first_pp_rank,
    is_last_pp_rank,
)

# The custom all-reduce of this process's TP group (``custom_all_reduce.CustomAllReduce``), if any.
_CUSTOM_AR: Any = None


def set_custom_all_reduce(custom: Any) -> None:
    """Route small TP all-reduces through ``custom`` (an object with ``should_use(x)`` and
    ``all_reduce(x) -> Tensor``); None routes everything to torch.distributed."""
    global _CUSTOM_AR
    _CUSTOM_AR = custom


def get_custom_all_reduce() -> Any:
    return _CUSTOM_AR


def destroy_custom_all_reduce() -> None:
    global _CUSTOM_AR
    if _CUSTOM_AR is not None:
        _CUSTOM_AR.close()
    _CUSTOM_AR = None


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` across TP ranks and return the sum (``x`` itself, reduced in place, when it goes
    through torch.distributed; a new tensor from the custom all-reduce)."""
    if get_tensor_model_parallel_world_size() == 1:
        return x
    custom = _CUSTOM_AR
    if custom is not None and custom.should_use(x):
        return custom.all_reduce(x)
    torch.distributed.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's ``x`` along ``dim`` (rank order)."""
    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return x
    x = x.contiguous()
    # One collective into a [size, *x.shape] buffer, then one copy into place.
    out = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
    group = get_tensor_model_parallel_group()
    if get_backend() == "nccl":
        torch.distributed.all_gather_into_tensor(out, x, group=group)
    else:  # gloo has no all_gather_into_tensor
        torch.distributed.all_gather(list(out.unbind(0)), x, group=group)
    dim = dim % x.dim()
    return out.movedim(0, dim).reshape(*x.shape[:dim], size * x.shape[dim], *x.shape[dim + 1:])


# ----------------------------------------------------------------------------- pipeline stages

TensorSpec = dict[str, tuple[tuple[int, ...] | torch.Size, torch.dtype]]


def pp_send_tensors(tensors: dict[str, torch.Tensor], async_op: bool = False) -> list[Any]:
    """Send ``tensors`` to the same TP rank of the next pipeline stage, in sorted-name order.

    The receiver must know the shapes and dtypes (``pp_recv_tensors``' spec): the step
    description already tells every rank how many tokens the step has. With ``async_op`` the
    sends are queued and their work handles returned (the caller keeps the tensors alive until
    they complete); otherwise this returns once every send is done.
    """
    if is_last_pp_rank():
        raise RuntimeError("the last pipeline stage has no next stage to send to")
    dst, group = get_next_pp_world_rank(), get_pp_group()
    works = []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        if async_op:
            works.append(torch.distributed.isend(t, dst=dst, group=group))
        else:
            torch.distributed.send(t, dst=dst, group=group)
    return works


def pp_recv_tensors(spec: TensorSpec, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Receive the tensors named in ``spec`` (name -> (shape, dtype)) from the same TP rank of the
    previous stage, into new tensors on ``device`` (default: this rank's CUDA device with NCCL, the
    CPU with gloo)."""
    if is_first_pp_rank():
        raise RuntimeError("the first pipeline stage has no previous stage to receive from")
    if get_pp_size() > 1 and device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if get_backend() == "nccl" else "cpu"
    src, group = get_prev_pp_world_rank(), get_pp_group()
    out = {}
    for name in sorted(spec):
        shape, dtype = spec[name]
        t = torch.empty(tuple(shape), dtype=dtype, device=device)
        torch.distributed.recv(t, src=src, group=group)
        out[name] = t
    return out
