"""Rotary embedding and the KV-cache write in one launch (the GPU attention path's prologue).

``rotary_embedding`` followed by ``reshape_and_cache`` is two small kernels per layer; at batch 1
each costs about as much as it does work. This kernel reads one token's q/k/v once: q and k are
rotated in place (neox style, ``cos_sin_cache`` rows as in ``aphrodite.kernels.rotary``), and the
rotated k plus v are written into the paged cache at ``slot_mapping`` (-1 = padding, not written).
"""
from __future__ import annotations

import torch

from aphrodite.kernels.paged_attention import reshape_and_cache_ref
from aphrodite.kernels.rotary import rotary_embedding_ref
from aphrodite.kernels.triton_utils import LazyKernel, next_pow2, tl, use_triton

__all__ = ["rope_and_cache", "rope_and_cache_ref"]


def rope_and_cache_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       cos_sin_cache: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """q [T, Hq, D], k/v [T, Hkv, D]: rotate q and k in place, then write k and v to their slots (an fp8
    cache gets ``k / k_scale``, ``v / v_scale``)."""
    d = q.shape[-1]
    rotary_embedding_ref(positions, q, k, d, cos_sin_cache)
    reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _rope_cache_kernel(pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, cs_ptr, k_cache_ptr, v_cache_ptr,
                       num_q_heads, num_kv_heads,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                       stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                       k_inv_scale, v_inv_scale,
                       HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_H: tl.constexpr, KV_FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    # Feature d pairs with d +- HALF inside the rotary part; features past 2*HALF pass through.
    rot_ok = offs_d < 2 * HALF
    first = offs_d < HALF
    partner = tl.where(rot_ok, tl.where(first, offs_d + HALF, offs_d - HALF), offs_d)
    c_idx = tl.where(first, offs_d, offs_d - HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + c_idx, mask=rot_ok, other=1.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + c_idx, mask=rot_ok, other=0.0).to(tl.float32)
    sin = tl.where(first, -sin, sin)
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, num_q_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < num_q_heads)[:, None] & d_ok[None, :]
        row = q_ptr + t * stride_qt + heads[:, None] * stride_qh
        x = tl.load(row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.debug_barrier()  # every lane has read its partner before any lane overwrites it
        tl.store(row + offs_d[None, :], (x * cos[None, :] + xp * sin[None, :]).to(q_ptr.dtype.element_ty),
                 mask=mask)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0)
    blk = slot // PAGE
    off = slot % PAGE
    for h0 in range(0, num_kv_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads < num_kv_heads)[:, None] & d_ok[None, :]
        row = k_ptr + t * stride_kt + heads[:, None] * stride_kh
        x = tl.load(row + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        k = (x * cos[None, :] + xp * sin[None, :]).to(k_ptr.dtype.element_ty)
        v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
        tl.debug_barrier()
        tl.store(row + offs_d[None, :], k, mask=mask)
        kc = k_cache_ptr + blk * stride_kcb + off * stride_kct + heads[:, None] * stride_kch + offs_d[None, :]
        vc = v_cache_ptr + blk * stride_vcb + off * stride_vct + heads[:, None] * stride_vch + offs_d[None, :]
        if KV_FP8:   # e4m3 saturates at 448
            k = tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -448.0), 448.0)
            v = tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -448.0), 448.0)
        tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask & valid)
        tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask & valid)


_rope_cache = LazyKernel(_rope_cache_kernel)


def rope_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   cos_sin_cache: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """q [T, Hq, D], k/v [T, Hkv, D] (strided views are fine): rotate q and k in place at
    ``positions`` [T] and write k, v into the cache at ``slot_mapping`` [T]; one launch on CUDA."""
    if not use_triton(q):
        rope_and_cache_ref(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache, k_scale, v_scale)
        return
    t, hq, d = q.shape
    if t == 0:
        return
    rot = cos_sin_cache.shape[-1]
    assert rot % 2 == 0 and rot <= d
    for x in (q, k, v, k_cache, v_cache):
        assert x.stride(-1) == 1, "head features must be contiguous"
    assert slot_mapping.shape[0] >= t and positions.shape[0] >= t
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    hkv = k.shape[1]
    d_pad = next_pow2(d)
    block_h = max(1, min(next_pow2(max(hq, hkv)), max(1, 4096 // d_pad)))
    _rope_cache(q.device)[(t,)](
        positions, slot_mapping, q, k, v, cache, k_cache, v_cache, hq, hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 1.0 / k_scale, 1.0 / v_scale,
        HEAD_DIM=d, D_PAD=d_pad, HALF=rot // 2, PAGE=k_cache.shape[1], BLOCK_H=block_h,
        KV_FP8=k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2), num_warps=4)
