"""Who this process is: its tensor-parallel (TP) and pipeline-parallel (PP) ranks and groups.

Global rank layout (vLLM's): ``rank = pp_rank * tp_size + tp_rank``. A TP group is the
``tp_size`` consecutive ranks of one pipeline stage; a PP group is the ``pp_size`` ranks with
the same TP rank, one per stage, so stage ``p`` sends to stage ``p + 1`` rank to rank.

Model layers ask here for their shard when they build their parameters, so the executor calls
``init_distributed`` in every rank process before the model is built. A single process is
rank 0 of 1 in both dimensions and needs no call at all. Tests can also set the ranks without
torch.distributed (``set_tensor_model_parallel`` / ``set_pipeline_model_parallel``) to build
one rank's shard of a model in-process.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# NVLink multicast (NVLS) must stay off in every process that touches NCCL or symmetric memory:
# the lent machines do not support it (see the device README). Set before any NCCL communicator
# exists; the executor sets them too for the processes it spawns.
MULTICAST_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def disable_nvlink_multicast() -> None:
    """Force the multicast switches off in this process's environment (and its children's)."""
    os.environ.update(MULTICAST_OFF_ENV)


@dataclass
class _ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None        # device group of the TP ranks (NCCL on GPUs, gloo on the CPU)
    tp_cpu_group: Any = None    # gloo group of the same ranks, for host-side exchanges
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: Any = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False   # we called init_process_group (so we destroy it)


_STATE = _ParallelState()


def init_distributed(world_size: int = 1, rank: int = 0, tp_size: int = 1, pp_size: int = 1,
                     backend: str | None = None, init_method: str | None = None,
                     local_rank: int = -1, disable_custom_all_reduce: bool = False) -> None:
    """Initialise torch.distributed (unless already done) and build the TP and PP groups.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise; ``init_method``
    to ``env://``. With CUDA, ``local_rank`` (default: ``rank`` modulo the visible devices) picks
    this process's device; every rank should see all GPUs of the host (CUDA IPC between TP ranks
    needs it). With NCCL and several TP ranks, small all-reduces go through the custom one-shot
    all-reduce unless ``disable_custom_all_reduce``. Every rank must call this with the same sizes.
    """
    if tp_size < 1 or pp_size < 1 or tp_size * pp_size != world_size:
        raise ValueError(f"world_size ({world_size}) must equal tensor_parallel_size ({tp_size}) x "
                         f"pipeline_parallel_size ({pp_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    disable_nvlink_multicast()
    import torch.distributed as dist
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank < 0:
            local_rank = rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(local_rank)
    local_rank = max(local_rank, 0)
    if world_size > 1 and _only_loopback(init_method):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo otherwise binds the hostname's address
    initialized_here = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend, init_method=init_method or "env://", world_size=world_size,
                                rank=rank, **kwargs)
        initialized_here = True
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}, not {rank} of {world_size}")
    backend = str(dist.get_backend())

    # Every rank creates every group, in the same order (torch.distributed requires it).
    tp_group = tp_cpu_group = pp_group = None
    for p in range(pp_size):
        ranks = [p * tp_size + t for t in range(tp_size)]
        group = dist.new_group(ranks)
        cpu_group = dist.new_group(ranks, backend="gloo") if backend != "gloo" else group
        if rank in ranks:
            tp_group, tp_cpu_group = group, cpu_group
    for t in range(tp_size):
        ranks = [p * tp_size + t for p in range(pp_size)]
        group = dist.new_group(ranks)
        if rank in ranks:
            pp_group = group

    global _STATE
    _STATE = _ParallelState(tp_rank=rank % tp_size, tp_size=tp_size, tp_group=tp_group,
                            tp_cpu_group=tp_cpu_group, pp_rank=rank // tp_size, pp_size=pp_size,
                            pp_group=pp_group, rank=rank, world_size=world_size, local_rank=local_rank,
                            backend=backend, initialized_here=initialized_here)
    if backend == "nccl" and tp_size > 1:
        # Create the TP communicator now: NCCL cannot start one inside a CUDA graph capture.
        dist.all_reduce(torch.zeros(1, device=torch.device("cuda", local_rank)), group=tp_group)
        if not disable_custom_all_reduce:
            from aphrodite.distributed import communication
            from aphrodite.distributed.custom_all_reduce import try_create_custom_all_reduce
            communication.set_custom_all_reduce(try_create_custom_all_reduce(
                tp_cpu_group, rank % tp_size, tp_size, torch.device("cuda", local_rank)))


def _only_loopback(init_method: str | None) -> bool:
    """True when the rendezvous is a file or a loopback address: all ranks are on this host."""
    if init_method is None:
        return os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost")
    return init_method.startswith("file://") or "127.0.0.1" in init_method or "localhost" in init_method


def destroy_distributed() -> None:
    """Tear down the custom all-reduce, the groups and (if ``init_distributed`` made it) the
    default process group; this process becomes rank 0 of 1 again."""
    global _STATE
    from aphrodite.distributed import communication
    communication.destroy_custom_all_reduce()
    import torch.distributed as dist
    if _STATE.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
    _STATE = _ParallelState()


def model_parallel_is_initialized() -> bool:
    return _STATE.backend is not None


# ----------------------------------------------------------------------------- getters

def get_tp_rank() -> int:
    return _STATE.tp_rank


def get_tp_size() -> int:
    return _STATE.tp_size


def get_tp_group() -> Any:
    """The torch.distributed group of this stage's TP ranks (None: the default group)."""
    return _STATE.tp_group


def get_tp_cpu_group() -> Any:
    """A gloo group of the TP ranks, for exchanging host objects (e.g. CUDA IPC handles)."""
    return _STATE.tp_cpu_group


def get_pp_rank() -> int:
    return _STATE.pp_rank


def get_pp_size() -> int:
    return _STATE.pp_size


def get_pp_group() -> Any:
    return _STATE.pp_group


def is_first_pp_rank() -> bool:
    return _STATE.pp_rank == 0


def is_last_pp_rank() -> bool:
    return _STATE.pp_rank == _STATE.pp_size - 1


def get_world_rank() -> int:
    return _STATE.rank


def get_world_size() -> int:
    return _STATE.world_size


def get_local_rank() -> int:
    return _STATE.local_rank


def get_backend() -> str | None:
    """The torch.distributed backend of the groups, None before ``init_distributed``."""
    return _STATE.backend


def get_next_pp_world_rank() -> int:
    """Global rank of the same TP rank in the next stage."""
    return _STATE.rank + _STATE.tp_size


def get_prev_pp_world_rank() -> int:
    """Global rank of the same TP rank in the previous stage."""
    return _STATE.rank - _STATE.tp_size


# ----------------------------------------------------------------------------- without torch.distributed

def set_tensor_model_parallel(rank: int, size: int, group: Any = None) -> None:
    """Record this process's TP rank, group size and torch.distributed group by hand (tests, or an
    executor that built its own groups)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"invalid tensor-parallel rank {rank} of size {size}")
    _STATE.tp_rank, _STATE.tp_size, _STATE.tp_group = rank, size, group
    _STATE.tp_cpu_group = group


def set_pipeline_model_parallel(rank: int, size: int, group: Any = None) -> None:
    """Record this process's PP stage and stage count by hand (building one stage in-process)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"invalid pipeline-parallel rank {rank} of size {size}")
    _STATE.pp_rank, _STATE.pp_size, _STATE.pp_group = rank, size, group


@contextlib.contextmanager
def model_parallel_ranks(tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> Iterator[None]:
    """Build modules as the given TP/PP rank inside the block (no communication happens), then
    restore the previous ranks."""
    saved = (_STATE.tp_rank, _STATE.tp_size, _STATE.tp_group, _STATE.tp_cpu_group,
             _STATE.pp_rank, _STATE.pp_size, _STATE.pp_group)
    set_tensor_model_parallel(tp_rank, tp_size)
    set_pipeline_model_parallel(pp_rank, pp_size)
    try:
        yield
    finally:
        (_STATE.tp_rank, _STATE.tp_size, _STATE.tp_group, _STATE.tp_cpu_group,
         _STATE.pp_rank, _STATE.pp_size, _STATE.pp_group) = saved


# vLLM's names, kept for the layers and callers that use them.
get_tensor_model_parallel_rank = get_tp_rank
get_tensor_model_parallel_world_size = get_tp_size
get_tensor_model_parallel_group = get_tp_group
get_pipeline_model_parallel_rank = get_pp_rank
get_pipeline_model_parallel_world_size = get_pp_size
get_pipeline_model_parallel_group = get_pp_group
