"""Rotary position embedding (neox / HF-Llama style: the two halves of each head are rotated).

Applied in place to q and k (which may be strided views into a fused qkv projection), reading one
row of a precomputed ``cos_sin_cache`` per token: ``[max_position, rotary_dim]`` with the cosines in
the first half and the sines in the second. Only the first ``rotary_dim`` features of each head rotate
(partial rotary); the rest pass through. Math runs in fp32 and rounds once.
"""
from __future__ import annotations

import torch

from aphrodite.kernels.triton_utils import LazyKernel, next_pow2, tl, use_triton

__all__ = ["build_cos_sin_cache", "rotary_embedding", "rotary_embedding_ref"]


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[max_position, 2 * len(inv_freq)]`` = cat(cos, sin) of ``position * inv_freq`` (fp32 math).

    Model code computes ``inv_freq`` (with any rope scaling) and calls this once.
    """
    t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _heads_view(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[T, H, D] view of a [T, H * D] or [T, H, D] tensor (no copy; in-place writes must land)."""
    return x.view(x.shape[0], -1, head_dim)


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
                         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place neox rotary on q [T, Hq(*D)] and k [T, Hkv(*D)]; returns (q, k)."""
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cs = cos_sin_cache[positions.long()].float()           # [T, rot]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        xv = _heads_view(x, head_dim)
        x1 = xv[..., :half].float()
        x2 = xv[..., half:rot].float()
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        xv[..., :rot] = torch.cat([o1, o2], dim=-1).to(x.dtype)
    return q, k


def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, num_q_heads, num_k_heads,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, HALF_PAD)
    r_mask = offs_r < HALF
    cos = tl.load(cache_ptr + pos * stride_c + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    # q heads, then k heads: same rotation, different base pointer and strides.
    for h0 in range(0, num_q_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < num_q_heads)[:, None] & r_mask[None, :]
        p1 = q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_r[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(q_ptr.dtype.element_ty), mask=mask)
    for h0 in range(0, num_k_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < num_k_heads)[:, None] & r_mask[None, :]
        p1 = k_ptr + t * stride_kt + heads[:, None] * stride_kh + offs_r[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(p1 + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(k_ptr.dtype.element_ty), mask=mask)


_rotary = LazyKernel(_rotary_kernel)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq*D] (or [T, Hq, D]) and k [T, Hkv*D] in place at ``positions`` [T]; returns (q, k).

    Triton on CUDA (or under TRITON_INTERPRET), else the reference.
    """
    if not use_triton(q):
        return rotary_embedding_ref(positions, q, k, head_dim, cos_sin_cache)
    rot = cos_sin_cache.shape[-1]
    assert rot % 2 == 0 and rot <= head_dim
    qv, kv = _heads_view(q, head_dim), _heads_view(k, head_dim)
    assert qv.stride(-1) == 1 and kv.stride(-1) == 1, "head features must be contiguous"
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    n = qv.shape[0]
    if n == 0:
        return q, k
    half = rot // 2
    half_pad = next_pow2(half)
    block_h = max(1, min(next_pow2(max(qv.shape[1], kv.shape[1])), max(1, 4096 // half_pad)))
    _rotary(q.device)[(n,)](
        positions, qv, kv, cache, qv.shape[1], kv.shape[1],
        qv.stride(0), qv.stride(1), kv.stride(0), kv.stride(1), cache.stride(0),
        HALF=half, HALF_PAD=half_pad, BLOCK_H=block_h, num_warps=4)
    return q, k
