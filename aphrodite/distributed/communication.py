"""Collectives over the tensor-parallel group and point-to-point sends between pipeline stages.

TP collectives are free no-ops with one rank. The all-reduce goes to the custom one-shot
all-reduce over CUDA IPC buffers when one is set up and the message is small enough for it
(decode: a few KB per layer), and to torch.distributed (NCCL / gloo) otherwise.

``run_overlapped`` runs two halves of a large step so that one half's all-reduces (NCCL, on its own
stream) proceed while the device computes the other half: each half runs the model on a thread of
its own, and the two take turns, switching at every all-reduce (issued asynchronously, waited for
only when that half resumes). Only one thread runs at a time and the switch points are the same on
every rank, so the ranks issue their collectives in the same order.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

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
    turns = getattr(_THREAD, "turns", None)
    if turns is not None:   # inside run_overlapped: the other half computes while this one reduces
        work = torch.distributed.all_reduce(x, group=get_tensor_model_parallel_group(), async_op=True)
        turns.hand_over(_THREAD.index)
        work.wait()
        return x
    custom = _CUSTOM_AR
    if custom is not None and custom.should_use(x):
        return custom.all_reduce(x)
    torch.distributed.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


# ----------------------------------------------------------------------------- two halves, overlapped

_THREAD = threading.local()   # .turns / .index: set on the threads of run_overlapped
T = TypeVar("T")


class _Turns:
    """Two threads taking turns: ``hand_over`` passes the turn to the other thread (unless it has
    finished) and returns when the turn comes back."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.turn = 0
        self.finished = [False, False]

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def hand_over(self, i: int) -> None:
        with self.cond:
            if self.finished[1 - i]:
                return
            self.turn = 1 - i
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == i)

    def finish(self, i: int) -> None:
        with self.cond:
            self.finished[i] = True
            self.turn = 1 - i
            self.cond.notify_all()


def run_overlapped(first: Callable[[], T], second: Callable[[], T]) -> tuple[T, T]:
    """``(first(), second())``, run in turns that switch at every TP all-reduce (see the module doc).

    ``first`` runs on this thread, ``second`` on a helper thread that takes this thread's CUDA device,
    stream and inference mode, so both halves' kernels queue on one stream in turn order."""
    turns = _Turns()
    results: list[Any] = [None, None]
    errors: list[BaseException] = []
    stream = torch.cuda.current_stream() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    inference = torch.is_inference_mode_enabled()

    def helper_context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if stream is not None:
            torch.cuda.set_device(stream.device)
            stack.enter_context(torch.cuda.stream(stream))
        stack.enter_context(torch.inference_mode(inference))
        return stack

    def run(i: int, fn: Callable[[], T]) -> None:
        _THREAD.turns, _THREAD.index = turns, i
        try:
            turns.wait(i)
            if errors:
                return
            if i == 0:
                results[0] = fn()
            else:
                with helper_context():
                    results[1] = fn()
        except BaseException as e:
            errors.append(e)
        finally:
            _THREAD.turns = None
            turns.finish(i)

    helper = threading.Thread(target=run, args=(1, second), name="overlapped-half", daemon=True)
    helper.start()
    run(0, first)
    helper.join()
    if errors:
        raise errors[0]
    return results[0], results[1]


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
