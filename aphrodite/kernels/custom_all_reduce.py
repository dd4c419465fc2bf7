"""One-shot all-reduce over peer-mapped buffers (CUDA IPC, NVLink), for small messages.

Every rank owns a staging buffer (two halves, used alternately) and a signal array, and has
the addresses of all ranks' buffers and signal arrays (mapped through CUDA IPC by
``aphrodite.distributed.custom_all_reduce``). One kernel launch per all-reduce, no host work:

1. each program copies its chunk of the input into its rank's staging half,
2. writes its epoch into slot ``[rank, program]`` of every rank's signal array (release, system scope),
3. waits until slot ``[peer, program]`` of its own signal array shows the epoch for every peer (acquire),
4. sums the chunk of every rank's staging half in rank order in fp32 (so all ranks get identical
   bits) and writes the output.

The epoch is a per-program counter kept on the device, so the kernel can be replayed from a
CUDA graph. The halves alternate by epoch parity: a peer can be at most one call ahead (it
needs our signal of the next call to get further), so it never overwrites the half we read.
A program waits only on the same program of its peers, never on another program of its own
rank, so there is no grid-wide barrier and no risk of deadlock from non-resident programs.
"""
from __future__ import annotations

import torch

from aphrodite.kernels.triton_utils import LazyKernel, cdiv, tl

__all__ = ["BLOCK", "EPOCH_MASK", "MAX_PROGRAMS", "launch_layout", "one_shot_all_reduce", "one_shot_all_reduce_ref"]

# Programs of one launch (one signal slot each) and elements per tile: enough programs and bytes
# in flight that reading the peers' halves over NVLink is bandwidth-bound, not latency-bound (a
# 2 MB message, batch-256 decode's, is 4 tiles per program; 8 warps load 16 bytes per thread).
MAX_PROGRAMS = 128
EPOCH_MASK = (1 << 30) - 1  # epochs wrap here (even, so the half parity survives the wrap)
BLOCK = 2048
NUM_WARPS = 8


def one_shot_all_reduce_ref(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The sum every rank gets: all ranks' tensors added in rank order in fp32, rounded once."""
    acc = inputs[0].float().clone()
    for x in inputs[1:]:
        acc += x.float()
    return acc.to(inputs[0].dtype)


def _one_shot_kernel(inp_ptr, out_ptr, buf_ptrs, sig_ptrs, counter_ptr, n, half_stride, tiles,
                     RANK: tl.constexpr, WORLD: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
                     EPOCH_MASK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    epoch = (tl.load(counter_ptr + pid) + 1) & EPOCH_MASK
    previous = (epoch + EPOCH_MASK) & EPOCH_MASK
    base = tl.multiple_of((epoch % 2).to(tl.int64) * half_stride, 16)
    start = pid.to(tl.int64) * tiles * BLOCK
    elem_ptr = tl.pointer_type(inp_ptr.dtype.element_ty)
    # Buffers come from cudaMalloc (256-byte aligned) and chunks start at multiples of BLOCK:
    # say so, or the loads and stores are not vectorised.
    own = tl.multiple_of(tl.load(buf_ptrs + RANK).to(elem_ptr, bitcast=True), 16)
    for t in range(tiles):
        offs = tl.max_contiguous(tl.multiple_of(start + t * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
        mask = offs < n
        tl.store(own + base + offs, tl.load(inp_ptr + offs, mask=mask), mask=mask)
    tl.debug_barrier()   # every thread's copy is done before the flag is released
    for p in tl.static_range(WORLD):
        sig = tl.load(sig_ptrs + p).to(tl.pointer_type(tl.int32), bitcast=True)
        tl.atomic_xchg(sig + RANK * MAX_PROGRAMS + pid, epoch, sem="release", scope="sys")
    own_sig = tl.load(sig_ptrs + RANK).to(tl.pointer_type(tl.int32), bitcast=True)
    for p in tl.static_range(WORLD):
        # A peer's slot holds the previous epoch until it arrives; it may already be one ahead.
        flag = tl.atomic_add(own_sig + p * MAX_PROGRAMS + pid, 0, sem="acquire", scope="sys")
        while flag == previous:
            flag = tl.atomic_add(own_sig + p * MAX_PROGRAMS + pid, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    for t in range(tiles):
        offs = tl.max_contiguous(tl.multiple_of(start + t * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            buf = tl.multiple_of(tl.load(buf_ptrs + p).to(elem_ptr, bitcast=True), 16)
            acc += tl.load(buf + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(counter_ptr + pid, epoch)


_one_shot = LazyKernel(_one_shot_kernel)


def launch_layout(n: int) -> tuple[int, int]:
    """``(programs, tiles per program)`` for ``n`` elements: program ``i`` owns elements
    ``[i * tiles * BLOCK, (i + 1) * tiles * BLOCK)`` and signal slot ``i``."""
    total_tiles = cdiv(n, BLOCK)
    tiles = cdiv(total_tiles, min(total_tiles, MAX_PROGRAMS))
    return cdiv(total_tiles, tiles), tiles


def one_shot_all_reduce(x: torch.Tensor, out: torch.Tensor, buf_ptrs: torch.Tensor, sig_ptrs: torch.Tensor,
                        counter: torch.Tensor, rank: int, world_size: int, half_bytes: int) -> torch.Tensor:
    """Sum ``x`` over the ranks into ``out`` (contiguous, same shape and dtype).

    ``buf_ptrs``/``sig_ptrs``: int64 ``[world_size]`` addresses of every rank's staging buffer
    (two halves of ``half_bytes``) and int32 signal array (``[world_size, MAX_PROGRAMS]``, zeroed
    at start); ``counter``: this rank's int32 ``[MAX_PROGRAMS]`` epochs (zeroed at start). All
    ranks must call it with the same sizes in the same order.
    """
    n = x.numel()
    if n * x.element_size() > half_bytes:
        raise ValueError(f"{n * x.element_size()} bytes exceed the custom all-reduce buffer ({half_bytes})")
    if n == 0:
        return out
    programs, tiles = launch_layout(n)
    _one_shot(x.device)[(programs,)](
        x, out, buf_ptrs, sig_ptrs, counter, n, half_bytes // x.element_size(), tiles,
        RANK=rank, WORLD=world_size, MAX_PROGRAMS=MAX_PROGRAMS, EPOCH_MASK=EPOCH_MASK, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return out
