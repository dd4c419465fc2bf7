"""LoRA shrink and expand over every adapter slot at once (punica's SGMV, as vLLM does it).

A batch mixes tokens of several adapters and of the base model. Each token carries the index
of the device slot that holds its adapter (``-1``: none). Per layer, all slots' weights are
stacked: ``a [S, R, K]`` (each slot's ``lora_A``, rank padded to ``R``) and ``b [S, N, R]``
(``lora_B`` with the scaling folded in; ``b`` may be a strided view, the CPU layer keeps it as
``[N, S, R]`` storage). Two launches per layer then cover the whole batch:

* ``lora_shrink``: ``buf[t] = x[t] @ a[slot[t]]^T`` (fp32, ``[T, R]``)
* ``lora_expand``: ``y[t] += buf[t] @ b[slot[t]]^T`` (in place)

On the GPU the tokens are grouped by slot once per forward pass (``lora_token_metadata``: a
stable sort plus per-slot counts and starts, all device ops, so CUDA graphs capture them) and
each Triton program multiplies a tile of one slot's tokens by that slot's weights; programs
past a slot's token count exit at once. The reference (the CPU path) needs no grouping: it
multiplies by every slot's weights and keeps each token's own slot through a one-hot mask,
which costs ``S`` times the (small) LoRA work but has no loop over adapters.

Small batches (decode at low concurrency, ``<= TILE_MAX_TOKENS`` tokens) take the tile kernels
instead. The host cuts the step's adapter tokens into tiles of at most ``TILE_M`` tokens of one
slot, each tile one row ``[slot, count, token ids...]`` (``lora_tiles_host``), so a program finds
its tokens with one load and no program exists for an empty slot. The shrink comes either from
the base GEMM itself (a plain weight with every slot's A rows appended below it gives each token's
shrink for every slot in its extra columns: ``lora_expand_tokens`` reads the token's own slot) or
from ``lora_shrink_tiles`` (K-split partials, no atomics, nothing to zero, on a side stream beside
the base GEMM; ``lora_expand_tiles`` sums them). Both expands read only the rank block of the
projection their columns belong to (``B`` of fused q/k/v or gate/up is block-diagonal). At a
handful of tokens a LoRA layer's GPU time is latency, not bandwidth (on an H200 a one-launch
shrink+expand that re-read A per program was slower than two launches): what is left after the
base GEMM is one launch with one short chain of dependent loads.
"""
from __future__ import annotations

import numpy as np
import torch

from aphrodite.kernels.triton_utils import LazyKernel, cdiv, next_pow2, tl, use_triton

__all__ = ["TILE_M", "TILE_MAX_TOKENS", "TILE_SPLIT_K", "LoRAMetadata", "lora_expand", "lora_expand_ref",
           "lora_expand_tiles", "lora_expand_tokens", "lora_shrink", "lora_shrink_ref", "lora_shrink_tiles",
           "lora_tiles_host", "lora_token_metadata", "lora_token_metadata_host", "num_tiles_bound", "partials_buffer"]

LoRAMetadata = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def lora_token_metadata_host(slots: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, counts, starts) of ``lora_token_metadata`` computed on the host (the runner's path: the
    step's slots are known there, so the device only receives the result)."""
    keys = slots.astype(np.int64) + 1
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=num_slots + 1)
    return order, counts, np.cumsum(counts) - counts


TILE_M = 16              # tokens per tile of the tile kernels (tl.dot's smallest M)
TILE_MAX_TOKENS = 32     # up to this many tokens in a step the layers use the tile kernels
TILE_SPLIT_K = 32        # most K chunks of ``lora_shrink_tiles`` (one program each, 128+ columns per chunk)


def num_tiles_bound(num_tokens: int, num_slots: int) -> int:
    """Most tiles ``num_tokens`` tokens over ``num_slots`` slots can need: a slot with ``c`` tokens needs
    ``ceil(c / M) <= (c - 1) // M + 1`` tiles, so ``u`` used slots need at most ``(T - 1) // M + u``."""
    return (num_tokens - 1) // TILE_M + min(num_slots, num_tokens) if num_tokens > 0 else 0


def lora_tiles_host(slots: np.ndarray, num_slots: int, max_tiles: int) -> np.ndarray:
    """``[max_tiles, 2 + TILE_M]`` int64: per tile its slot, its token count (0: no tile) and its tokens'
    batch rows, the tokens of each slot in batch order (base-model tokens, slot ``-1``, get no tile)."""
    tiles = np.zeros((max_tiles, 2 + TILE_M), dtype=np.int64)
    i = 0
    for slot in range(num_slots):
        rows = np.flatnonzero(slots == slot)
        for off in range(0, len(rows), TILE_M):
            part = rows[off:off + TILE_M]
            tiles[i, 0], tiles[i, 1] = slot, len(part)
            tiles[i, 2:2 + len(part)] = part
            i += 1
    return tiles


def lora_token_metadata(slots: torch.Tensor, num_slots: int) -> LoRAMetadata:
    """(slots, token ids sorted by slot, tokens per slot, first sorted position per slot).

    Counts and starts have ``num_slots + 1`` entries: entry 0 is the tokens without an adapter.
    Only device ops with fixed output sizes, so the computation can sit inside a CUDA graph."""
    keys = slots.long() + 1
    order = torch.argsort(keys, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=slots.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    starts = torch.cumsum(counts, 0) - counts
    return slots, order, counts, starts


# ---- references (the CPU path and the test oracle) ---------------------------------------
def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[T, R]`` fp32: row t is ``x[t] @ a[slots[t]]^T``, zero where ``slots[t] < 0``."""
    s, r, k = a.shape
    t = x.shape[0]
    full = (x @ a.reshape(s * r, k).to(x.dtype).t()).view(t, s, r).float()
    idx = slots.long().clamp(min=0).view(t, 1, 1).expand(t, 1, r)
    out = full.gather(1, idx).squeeze(1)
    return out.masked_fill_((slots < 0).view(t, 1), 0.0)


def lora_expand_ref(buf: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y[t] += buf[t] @ b[slots[t]]^T`` in place (nothing where ``slots[t] < 0``); returns ``y``."""
    s, n, r = b.shape
    t = buf.shape[0]
    onehot = torch.zeros(t, s, r, dtype=b.dtype, device=buf.device)
    idx = slots.long().clamp(min=0).view(t, 1, 1).expand(t, 1, r)
    onehot.scatter_(1, idx, buf.to(b.dtype).masked_fill((slots < 0).view(t, 1), 0.0).unsqueeze(1))
    flat = b.permute(1, 0, 2).reshape(n, s * r)      # free when b's storage is [N, S, R]
    y += (onehot.view(t, s * r) @ flat.t()).to(y.dtype)
    return y


# ---- Triton kernels -----------------------------------------------------------------------
def _shrink_kernel(x_ptr, a_ptr, out_ptr, order_ptr, counts_ptr, starts_ptr, N, K,
                   sx_t, sx_k, sa_s, sa_n, sa_k, so_t, so_n,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1) // SPLIT_K
    pid_k = tl.program_id(1) % SPLIT_K
    slot = tl.program_id(2)
    count = tl.load(counts_ptr + slot + 1)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + slot + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_base = a_ptr + slot.to(tl.int64) * sa_s
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + tok[:, None] * sx_t + offs_k[None, :] * sx_k,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + offs_n[None, :] * sa_n + offs_k[:, None] * sa_k,
                     mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(xt, at.to(xt.dtype), input_precision="ieee")
        else:
            acc += tl.dot(xt, at.to(xt.dtype))
    ptrs = out_ptr + tok[:, None] * so_t + offs_n[None, :] * so_n
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


def _expand_kernel(buf_ptr, b_ptr, y_ptr, order_ptr, counts_ptr, starts_ptr, N, R,
                   sbuf_t, sbuf_r, sb_s, sb_n, sb_r, sy_t, sy_n,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2)
    count = tl.load(counts_ptr + slot + 1)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + slot + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    bt = tl.load(b_ptr + slot.to(tl.int64) * sb_s + offs_n[None, :] * sb_n + offs_r[:, None] * sb_r,
                 mask=n_mask[None, :] & r_mask[:, None], other=0.0)
    xt = tl.load(buf_ptr + tok[:, None] * sbuf_t + offs_r[None, :] * sbuf_r,
                 mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(bt.dtype)
    if IEEE:
        delta = tl.dot(xt, bt, input_precision="ieee")
    else:
        delta = tl.dot(xt, bt)
    y_ptrs = y_ptr + tok[:, None] * sy_t + offs_n[None, :] * sy_n
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _shrink_tiles_kernel(x_ptr, a_ptr, part_ptr, tiles_ptr, tile_stride, K, RW, K_CHUNK,
                         sx_t, sx_k, sa_s, sa_r, sa_k, sp_s, sp_t,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Partial shrink of one tile over one K chunk: ``part[pid_k, tile * M + row, :RW]`` (every rank block)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tiles_ptr + pid_m * tile_stride
    slot = tl.load(row)
    count = tl.load(row + 1)
    offs_m = tl.arange(0, BLOCK_M)
    tok = tl.load(row + 2 + offs_m)        # one load for the tile: no dependent loads before x and A
    if count == 0:
        return
    m_mask = offs_m < count
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < RW
    a_base = a_ptr + slot.to(tl.int64) * sa_s + offs_r[None, :] * sa_r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_end = tl.minimum(K, (pid_k + 1) * K_CHUNK)
    for k0 in range(pid_k * K_CHUNK, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        xt = tl.load(x_ptr + tok[:, None] * sx_t + offs_k[None, :] * sx_k,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + offs_k[:, None] * sa_k, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xt, at.to(xt.dtype), input_precision="ieee")
        else:
            acc += tl.dot(xt, at.to(xt.dtype))
    ptrs = part_ptr + pid_k * sp_s + (pid_m * BLOCK_M + offs_m[:, None]) * sp_t + offs_r[None, :]
    tl.store(ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


def _expand_tiles_kernel(part_ptr, b_ptr, y_ptr, tiles_ptr, tile_stride, R, N, T1, T2, O1, O2,
                         sp_s, sp_t, sb_s, sb_n, sb_r, sy_t, sy_n,
                         SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                         IEEE: tl.constexpr):
    """Sum one tile's ``SPLIT`` partial shrinks (the rank block of its columns' projection; ``SPLIT=0``:
    read its tokens' shrink values, token-major) and add the expand of one block of output columns.
    Column blocks ``< T1`` belong to projection 0 (columns ``[0, O1)``), ``< T2`` to projection 1
    (``[O1, O2)``), the rest to projection 2. One chain of dependent loads: the tile's row, then B, y
    and the shrink values together (partials: whole power-of-two rank blocks, no rank mask, the
    buffer is padded past the widest block and finite), then the store."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = tiles_ptr + pid_m * tile_stride
    slot = tl.load(row)
    count = tl.load(row + 1)
    offs_m = tl.arange(0, BLOCK_M)
    tok = tl.load(row + 2 + offs_m)
    if count == 0:
        return
    proj = (pid_n >= T1).to(tl.int32) + (pid_n >= T2).to(tl.int32)
    col0 = tl.where(proj == 0, 0, tl.where(proj == 1, O1, O2))
    col_end = tl.where(proj == 0, O1, tl.where(proj == 1, O2, N))
    first_block = tl.where(proj == 0, 0, tl.where(proj == 1, T1, T2))
    offs_n = col0 + (pid_n - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col_end
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    rank = proj * R + offs_r
    m_mask = offs_m < count
    bt = tl.load(b_ptr + slot.to(tl.int64) * sb_s + offs_n[None, :] * sb_n + rank[:, None] * sb_r,
                 mask=n_mask[None, :] & r_mask[:, None], other=0.0)
    y_ptrs = y_ptr + tok[:, None] * sy_t + offs_n[None, :] * sy_n
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    if SPLIT == 0:      # token-major shrink values: part[tok, slot * sp_s + rank] (a GEMM's extra columns)
        acc = tl.load(part_ptr + tok[:, None] * sp_t + slot.to(tl.int64) * sp_s + rank[None, :],
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    else:
        p_ptrs = part_ptr + (pid_m * BLOCK_M + offs_m[:, None]) * sp_t + rank[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(p_ptrs + s * sp_s, mask=m_mask[:, None], other=0.0)
    if IEEE:
        delta = tl.dot(acc.to(bt.dtype), bt, input_precision="ieee")
    else:
        delta = tl.dot(acc.to(bt.dtype), bt)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


_shrink = LazyKernel(_shrink_kernel)
_expand = LazyKernel(_expand_kernel)
_shrink_tiles = LazyKernel(_shrink_tiles_kernel)
_expand_tiles = LazyKernel(_expand_tiles_kernel)


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 64 else 32 if num_tokens <= 1024 else 64


SPLIT_K_MAX_TOKENS = 1024   # up to this many tokens the shrink splits K across programs (atomic adds)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, meta: LoRAMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, R]`` fp32 with ``x[t] @ a[slot[t]]^T`` on adapter rows (other rows: zero on the CPU,
    unspecified on the GPU: ``lora_expand`` never reads them).

    ``out``: an all-zero ``[T, R]`` fp32 buffer to accumulate into (the layers share one, zeroed once per
    forward pass, so a decode step does not pay a memset per layer); by default a new one."""
    slots = meta[0]
    if not use_triton(x):
        return lora_shrink_ref(x, a, slots)
    _, order, counts, starts = meta
    t, k = x.shape
    s, r, _ = a.shape
    bm = _block_m(t)
    bn = max(16, min(64, next_pow2(r)))
    bk = 64 if k >= 64 else max(16, next_pow2(k))
    # Few token tiles (decode): split K across programs so the GPU has enough of them.
    split_k = max(1, min(16, k // (bk * 4))) if t <= SPLIT_K_MAX_TOKENS else 1
    if out is None:
        out = (torch.zeros if split_k > 1 else torch.empty)((t, r), dtype=torch.float32, device=x.device)
    grid = (cdiv(t, bm), cdiv(r, bn) * split_k, s)
    _shrink(x.device)[grid](x, a, out, order, counts, starts, r, k, x.stride(0), x.stride(1),
                            a.stride(0), a.stride(1), a.stride(2), out.stride(0), out.stride(1),
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, IEEE=x.dtype == torch.float32,
                            num_warps=4)
    return out


def lora_expand(buf: torch.Tensor, b: torch.Tensor, meta: LoRAMetadata, y: torch.Tensor) -> torch.Tensor:
    """``y[t] += buf[t] @ b[slot[t]]^T`` in place for adapter rows; returns ``y`` (``[T, N]``)."""
    slots = meta[0]
    if not use_triton(y):
        return lora_expand_ref(buf, b, slots, y)
    _, order, counts, starts = meta
    t, r = buf.shape
    s, n, _ = b.shape
    bm = _block_m(t)
    bn = 128 if n >= 128 else max(16, next_pow2(n))
    br = max(16, next_pow2(r))
    grid = (cdiv(t, bm), cdiv(n, bn), s)
    _expand(y.device)[grid](buf, b, y, order, counts, starts, n, r, buf.stride(0), buf.stride(1),
                            b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, IEEE=b.dtype == torch.float32, num_warps=4)
    return y


def _column_blocks(sizes: list[int], n: int, bn: int) -> tuple[int, int, int, int, int]:
    """(T1, T2, O1, O2, blocks): where projections 1 and 2 start, in column blocks and in columns."""
    if len(sizes) > 3 or sum(sizes) != n:
        raise ValueError(f"the LoRA tile kernels take 1 to 3 projections covering the {n} output columns, got {sizes}")
    blocks = [cdiv(s, bn) for s in sizes] + [0] * (3 - len(sizes))
    o1 = sizes[0] if len(sizes) > 1 else n
    o2 = sizes[0] + sizes[1] if len(sizes) > 2 else n
    return blocks[0], blocks[0] + blocks[1], o1, o2, sum(blocks)


def partials_buffer(max_tiles: int, width: int, device: torch.device) -> torch.Tensor:
    """Zeroed fp32 ``[TILE_SPLIT_K, max_tiles * TILE_M, 2 * width]`` for ``lora_shrink_tiles``: the expand
    reads whole power-of-two rank blocks without masks, so the padding keeps those reads in bounds and
    finite (``width``: the widest layer's fused projections x max rank)."""
    return torch.zeros(TILE_SPLIT_K, max_tiles * TILE_M, 2 * max(16, width), dtype=torch.float32, device=device)


def lora_shrink_tiles(x: torch.Tensor, a: torch.Tensor, tiles: torch.Tensor, part: torch.Tensor,
                      split: int | None = None, block_k: int = 128, num_warps: int = 4) -> torch.Tensor:
    """Partial shrinks ``part[s, tile * TILE_M + row, :P*R]`` of every tile's tokens over K chunk ``s`` (all
    rank blocks; ``lora_expand_tiles`` sums them) into ``part`` (``partials_buffer``); returns the used
    chunks. No atomics and nothing to zero: every entry the expand uses is written."""
    k = x.shape[1]
    rw = a.shape[1]
    split = split or max(1, min(TILE_SPLIT_K, k // 128))
    chunk = cdiv(cdiv(k, split), block_k) * block_k
    split = cdiv(k, chunk)
    grid = (tiles.shape[0], split)
    _shrink_tiles(x.device)[grid](x, a, part, tiles, tiles.stride(0), k, rw, chunk,
                                  x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
                                  part.stride(0), part.stride(1),
                                  BLOCK_M=TILE_M, BLOCK_K=block_k, BLOCK_R=max(16, next_pow2(rw)),
                                  IEEE=x.dtype == torch.float32, num_warps=num_warps)
    return part[:split]


def _expand_launch(part: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor, y: torch.Tensor, sizes: list[int],
                   rank: int, split: int, sp_s: int, sp_t: int, block_n: int | None, num_warps: int) -> torch.Tensor:
    n = y.shape[1]
    bn = block_n or (32 if n <= 8192 else 64)
    t1, t2, o1, o2, blocks = _column_blocks(sizes, n, bn)
    grid = (tiles.shape[0], blocks)
    _expand_tiles(y.device)[grid](part, b, y, tiles, tiles.stride(0), rank, n, t1, t2, o1, o2,
                                  sp_s, sp_t, b.stride(0), b.stride(1), b.stride(2),
                                  y.stride(0), y.stride(1), SPLIT=split, BLOCK_M=TILE_M, BLOCK_N=bn,
                                  BLOCK_R=max(16, next_pow2(rank)), IEEE=b.dtype == torch.float32,
                                  num_warps=num_warps)
    return y


def lora_expand_tiles(part: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor, y: torch.Tensor,
                      sizes: list[int], rank: int, block_n: int | None = None, num_warps: int = 1) -> torch.Tensor:
    """``y[t] += (sum_s part[s, row(t)]) @ b[slot[t]]^T`` per tile (``part`` as ``lora_shrink_tiles``
    returns it), each projection's columns from its own rank block; returns ``y``.

    Narrow column blocks and one warp per program: measured fastest on an H200 at one token (each
    program is a short chain of loads; more programs keep more of them in flight)."""
    br = max(16, next_pow2(rank))
    if part.shape[2] < len(sizes) * rank + br - rank:
        raise ValueError("lora_expand_tiles needs the partials padded past the widest rank block (partials_buffer)")
    return _expand_launch(part, b, tiles, y, sizes, rank, part.shape[0], part.stride(0), part.stride(1),
                          block_n, num_warps)


def lora_expand_tokens(shrunk: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor, y: torch.Tensor,
                       sizes: list[int], rank: int, block_n: int | None = None, num_warps: int = 1) -> torch.Tensor:
    """``lora_expand_tiles`` from token-major shrink values: ``shrunk [T, S * P*rank]`` holds every slot's
    ``x[t] @ a[slot]^T`` (what a GEMM over the base weight with all slots' A rows appended gives in its
    extra columns); each tile reads its own slot's block."""
    return _expand_launch(shrunk, b, tiles, y, sizes, rank, 0, b.shape[2], shrunk.stride(0), block_n, num_warps)
