"""A one-shot all-reduce for small messages between the GPUs of one host, over CUDA IPC.

Batch-1 decode of an 8B model at TP=2 does 64 all-reduces of 8 KB per token; NCCL's fixed cost
per call (several microseconds) is then a large share of the step. Here every rank allocates one
device buffer (two staging halves and a signal array), shares its CUDA IPC handle with the other
ranks over the gloo group, and maps theirs, so a kernel can read the peers' staging buffers
directly over NVLink (``aphrodite.kernels.custom_all_reduce``). Messages up to ``max_bytes`` go
through it, larger ones to NCCL. It is graph-capturable: the kernel keeps its own epochs on the
device. No multicast object is involved (NVLink multicast must stay off on the lent machines).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Larger messages go to NCCL (overridable: APHRODITE_CUSTOM_AR_MAX_BYTES). On 2 x H200 (NVLink, graphs)
# the one-shot kernel wins up to 8 MB (2 MB: 14.0 vs 27.9 us, 8 MB: 36.1 vs 46.6) and loses at 16 MB.
# With more ranks each reads every peer's whole message, so it stops paying off much earlier.
DEFAULT_MAX_BYTES = 1 << 20
TWO_RANK_MAX_BYTES = 8 << 20
MAX_WORLD_SIZE = 8
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _CudaIpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_byte * 64)]


def _find_cudart() -> str:
    """Path of the CUDA runtime library this process already loaded (torch's), so that the
    buffers live in the same context as torch's tensors."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "libcudart" in os.path.basename(path):
                    return path
    except OSError:
        pass
    for name in ("libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart")):
        if name:
            try:
                ctypes.CDLL(name)
                return name
            except OSError:
                continue
    raise RuntimeError("the CUDA runtime library (libcudart) was not found")


class CudaRuntime:
    """The few CUDA runtime calls the IPC buffers need, through ctypes."""

    def __init__(self) -> None:
        torch.cuda.init()
        lib = ctypes.CDLL(_find_cudart())
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_CudaIpcMemHandle), ctypes.c_void_p]
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _CudaIpcMemHandle, ctypes.c_uint]
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib = lib

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"{what} failed: {self.lib.cudaGetErrorString(err).decode()}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), "cudaMalloc")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        self._check(self.lib.cudaMemset(ctypes.c_void_p(ptr), value, nbytes), "cudaMemset")

    def ipc_handle(self, ptr: int) -> bytes:
        handle = _CudaIpcMemHandle()
        self._check(self.lib.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(ptr)), "cudaIpcGetMemHandle")
        return bytes(handle.reserved)

    def ipc_open(self, handle: bytes) -> int:
        h = _CudaIpcMemHandle()
        ctypes.memmove(h.reserved, handle, 64)
        ptr = ctypes.c_void_p()
        # cudaIpcMemLazyEnablePeerAccess = 1
        self._check(self.lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, 1), "cudaIpcOpenMemHandle")
        return int(ptr.value or 0)

    def ipc_close(self, ptr: int) -> None:
        self._check(self.lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")


class CustomAllReduce:
    """The IPC-mapped buffers of one TP group and the one-shot kernel over them.

    Collective: every rank of ``cpu_group`` (a gloo group of the TP ranks) constructs it
    together. ``max_bytes`` is both the largest message it takes and each staging half's size.
    """

    def __init__(self, cpu_group: Any, rank: int, world_size: int, device: torch.device,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        import torch.distributed as dist

        from aphrodite.kernels.custom_all_reduce import MAX_PROGRAMS
        if not 2 <= world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"the custom all-reduce supports 2 to {MAX_WORLD_SIZE} ranks, not {world_size}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world_size, self.device = rank, world_size, device
        self.max_bytes = max_bytes
        self.closed = True
        self._own = 0
        self._peers: list[int] = []
        self._cuda: CudaRuntime | None = None
        # Every step below runs the same collectives on every rank, failing or not, and the ranks
        # agree after each one: a rank must never be left waiting in a collective the others skipped.
        error = ""
        try:
            self._cuda = CudaRuntime()
        except (RuntimeError, OSError) as e:
            error = str(e)
        devices: list[Any] = [None] * world_size
        dist.all_gather_object(devices, device.index, group=cpu_group)
        if len(set(devices)) != world_size:
            error = f"TP ranks share GPUs {devices} (each rank needs all GPUs visible and its own)"
        for peer in devices:
            if not error and peer != device.index and not torch.cuda.can_device_access_peer(device.index, peer):
                error = f"GPU {device.index} cannot access GPU {peer} peer-to-peer"
        self._agree(cpu_group, error)
        signal_bytes = world_size * MAX_PROGRAMS * 4
        total = 2 * max_bytes + signal_bytes
        assert self._cuda is not None
        handle = None
        with torch.cuda.device(device):
            try:
                self._own = self._cuda.malloc(total)
                self._cuda.memset(self._own, 0, total)
                torch.cuda.synchronize(device)
                handle = self._cuda.ipc_handle(self._own)
            except RuntimeError as e:
                error = str(e)
            handles: list[Any] = [None] * world_size
            dist.all_gather_object(handles, handle, group=cpu_group)
            if not error and any(h is None for h in handles):
                error = "another TP rank could not allocate its buffer"
            self._agree(cpu_group, error)
            ptrs = []
            for r, peer_handle in enumerate(handles):
                if r == rank:
                    ptrs.append(self._own)
                    continue
                try:
                    ptrs.append(self._cuda.ipc_open(peer_handle))
                    self._peers.append(ptrs[-1])
                except RuntimeError as e:
                    error = error or str(e)
            self._agree(cpu_group, error)
        self.buf_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=device)
        self.sig_ptrs = torch.tensor([p + 2 * max_bytes for p in ptrs], dtype=torch.int64, device=device)
        self.counter = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)
        self.closed = False
        dist.barrier(group=cpu_group)   # nobody launches before every rank has mapped every buffer
        self._self_test(cpu_group)

    def _self_test(self, cpu_group: Any) -> None:
        """One real all-reduce at start-up (it also compiles the kernel): a kernel that does not
        build or a protocol that does not hold on this machine disables the custom path on every
        rank instead of corrupting activations later."""
        error = ""
        try:
            x = torch.full((4096,), float(self.rank + 1), dtype=torch.bfloat16, device=self.device)
            out = self.all_reduce(x)
            torch.cuda.synchronize(self.device)
            expected = self.world_size * (self.world_size + 1) / 2
            if not bool((out == expected).all()):
                error = f"self-test sum is {out[:4].tolist()}, expected {expected}"
        except Exception as e:   # a Triton compile or launch error: same on every rank
            error = f"self-test failed: {type(e).__name__}: {e}"
        self._agree(cpu_group, error)

    def _agree(self, cpu_group: Any, error: str) -> None:
        """Raise on every rank (after freeing what this one holds) if any rank saw an error."""
        import torch.distributed as dist
        ok = torch.tensor([0 if error else 1], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=cpu_group)
        if int(ok) == 1:
            return
        self.closed = False
        self.close()
        raise RuntimeError(error or "another TP rank could not set up the custom all-reduce")

    def should_use(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through this all-reduce (small, contiguous, on this GPU)."""
        return (not self.closed and x.is_cuda and x.dtype in _DTYPES and x.is_contiguous()
                and x.numel() * x.element_size() <= self.max_bytes)

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of ``x`` over the TP ranks, in a new tensor (or ``out``)."""
        from aphrodite.kernels.custom_all_reduce import one_shot_all_reduce
        out = torch.empty_like(x) if out is None else out
        return one_shot_all_reduce(x, out, self.buf_ptrs, self.sig_ptrs, self.counter, self.rank,
                                   self.world_size, self.max_bytes)

    def close(self) -> None:
        """Unmap the peers' buffers and free ours (after the device is idle)."""
        if self.closed:
            return
        self.closed = True
        if self._cuda is None:
            return
        try:
            torch.cuda.synchronize(self.device)
            for ptr in self._peers:
                self._cuda.ipc_close(ptr)
            if self._own:
                self._cuda.free(self._own)
            self._peers, self._own = [], 0
        except RuntimeError as e:   # at interpreter exit CUDA may already be torn down
            logger.debug("custom all-reduce cleanup: %s", e)


def custom_all_reduce_max_bytes(world_size: int = 2) -> int:
    default = TWO_RANK_MAX_BYTES if world_size == 2 else DEFAULT_MAX_BYTES
    return int(os.environ.get("APHRODITE_CUSTOM_AR_MAX_BYTES", default))


def try_create_custom_all_reduce(cpu_group: Any, rank: int, world_size: int,
                                 device: torch.device) -> CustomAllReduce | None:
    """A ``CustomAllReduce`` for the TP group, or None (with a warning) where it cannot work.

    All ranks agree: if any rank fails to set it up, none uses it (a rank on the custom path and
    another on NCCL would wait for each other forever).
    """
    start = time.perf_counter()
    try:
        custom = CustomAllReduce(cpu_group, rank, world_size, device, custom_all_reduce_max_bytes(world_size))
        if rank == 0:
            logger.info("Custom all-reduce on for TP all-reduces up to %d bytes (NCCL above); set up and "
                        "self-tested in %.1f s", custom.max_bytes, time.perf_counter() - start)
        return custom
    except (RuntimeError, ValueError) as e:   # raised on every rank alike (see CustomAllReduce)
        logger.warning("Custom all-reduce disabled, NCCL does all TP all-reduces: %s", e)
        return None
