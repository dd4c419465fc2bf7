"""Weight-only quantized matmul: ``y = x @ dequant(W)`` with the dequantization fused into the GEMM.

One kernel family serves every int4 format (AutoAWQ, GPTQ with or without act-order, compressed-tensors
pack-quantized; each is repacked once at load into the canonical layout below) and FP8 weights
(per-channel or 128x128 block scales) at the batch sizes where reading weights dominates.

Canonical int4 layout (what ``repack_int4`` produces):
* ``qweight`` int32 ``[K, N // 8]``: nibble ``j`` (bits ``4j..4j+3``) of word ``w`` of row ``k`` is the
  unsigned 4-bit code of output feature ``8w + INT4_ORDER[j]``, ``INT4_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``
  (AutoAWQ's order): ``(word >> 4i) & 0x000F000F`` holds features ``2i`` and ``2i + 1`` in its two 16-bit
  halves, the pair a packed half-precision register wants;
* ``scales`` ``[K // group, N]`` in the activation dtype; ``zeros`` the same shape holding the integer
  zero points as floats (None: symmetric, zero point 8); ``w[k, n] = (q[k, n] - z[g, n]) * s[g, n]``;
* act-order (GPTQ ``desc_act``): rows are stored sorted by group, ``perm[k]`` names the input column
  row ``k`` multiplies (the kernel gathers ``x`` through it); ``g_idx[k]`` gives row ``k``'s group when the
  groups are not runs of ``group`` rows (a tensor-parallel shard of an act-order layer).

FP8 weights: ``[N, K]`` float8_e4m3fn (read through strides), ``scales`` ``[K // bk, N // bn]``-shaped
blocks (``bk = bn = 128``) or one scale per output feature.

Launch shapes: a program owns ``BLOCK_M x BLOCK_N`` outputs and a slice of K (split-K). With several
splits every program stores an fp32 partial and the last one to finish a tile sums them and writes the
output (an arrival counter per tile, re-armed by that program), so there is no reduce launch. A single
row (decode at batch 1) accumulates with FMAs in a ``[BLOCK_K, BLOCK_N]`` register tile and reduces
once at the end; more rows use ``tl.dot``. On the GPU the tile configuration comes from fixed tables per
rows bucket (an opt-in in-process tuner, ``APHRODITE_QUANT_TUNE=1``, times candidates instead); large row
counts dequantize to a scratch weight and call cuBLAS.

int4 with fp16/bf16 activations at 5+ rows (decode batches, prefill) has its own kernel,
``_w4_gemm_kernel``: the codes become half floats by OR-ing exponent bits over nibble pairs (no int -> float
conversion), scale and zero are applied with packed half arithmetic, and each step's dequantization
overlaps the previous step's tensor-core MMA. Its tile table (``_w4_candidates``) is keyed on rows buckets;
the general kernel keeps FP8 weight-only, fp32 activations and uneven act-order groups. The engine dispatches
from fixed tables (``_w4_table``, ``_default_config``); ``APHRODITE_QUANT_TUNE=1`` times candidates instead
(GPU benchmarks), ``APHRODITE_W4A16=0`` keeps int4 on the general kernel.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from aphrodite.kernels.precompile import deferring
from aphrodite.kernels.triton_utils import HAS_TRITON, DeviceFunction, LazyKernel, cdiv, next_pow2, tl, use_triton
from aphrodite.kernels.w4_wgmma import w4_wgmma_launch, w4_ws_launch, wgmma_supported

__all__ = ["FMT_FP8", "FMT_INT4", "INT4_ORDER", "QuantWeight", "dequantize", "quant_matmul", "quant_matmul_ref",
           "repack_int4", "unpack_int4_cols", "pack_int4_cols", "w4_supported"]

FMT_INT4 = 0
FMT_FP8 = 1

#: canonical int4 packing: nibble j of a word holds output feature 8w + INT4_ORDER[j]
INT4_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class QuantWeight:
    """A weight in the kernel's canonical form (see the module docstring); ``k``/``n`` are logical sizes."""

    fmt: int
    weight: torch.Tensor                 # int4: int32 [K, N/8]; fp8: [N, K] float8_e4m3fn
    scales: torch.Tensor                 # int4: [K/group, N]; fp8: [K/bk, N/bn] (per-channel: [1, N])
    k: int
    n: int
    group: int                           # K rows per scale row (fp8 per-channel: K)
    scale_bn: int = 1                    # N features per scale column (fp8 block: 128)
    zeros: torch.Tensor | None = None    # int4 asymmetric: [K/group, N] float zero points
    perm: torch.Tensor | None = None     # int32 [K]: input column of stored row k (act-order)
    g_idx: torch.Tensor | None = None    # int32 [K]: group of stored row k when groups are not runs

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scales, self.zeros, self.perm, self.g_idx) if t is not None]


# --------------------------------------------------------------------------------------------------
# Packing helpers and the reference (the CPU path and the oracle)
# --------------------------------------------------------------------------------------------------

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``[R, C]`` -> uint8 codes ``[R, 8C]``; nibble ``i`` of word ``c`` holds column ``8c + order[i]``
    (sequential when ``order`` is None)."""
    codes = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF          # [R, C, 8] by nibble
    if order is not None:
        inv = [0] * 8
        for i, col in enumerate(order):
            inv[col] = i
        codes = codes[..., inv]
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_int4_cols(codes: torch.Tensor, order: tuple[int, ...] | None = INT4_ORDER) -> torch.Tensor:
    """uint8/int codes ``[R, 8C]`` (0..15) -> int32 ``[R, C]``; nibble ``i`` of word ``c`` holds column
    ``8c + order[i]`` (the canonical ``INT4_ORDER`` by default, sequential when ``order`` is None)."""
    r, c8 = codes.shape
    if c8 % 8:
        raise ValueError(f"int4 packing needs a multiple of 8 columns, got {c8}")
    cols = codes.to(torch.int32).reshape(r, c8 // 8, 8)
    if order is not None:
        cols = cols[..., list(order)]
    nib = cols << _SHIFTS.to(codes.device)
    return _sum_to_int32(nib)


def _sum_to_int32(nib: torch.Tensor) -> torch.Tensor:
    """OR the eight shifted nibbles of each word (disjoint bits, so a wrapping int32 sum is the OR)."""
    out = nib[..., 0].clone()
    for i in range(1, 8):
        out |= nib[..., i]
    return out


def repack_int4(codes_kn: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                g_idx: torch.Tensor | None = None) -> QuantWeight:
    """Canonical int4 weight from unpacked codes ``[K, N]`` (0..15), ``scales``/``zeros`` ``[groups, N]``
    and, for act-order checkpoints, ``g_idx [K]`` (group of each input row)."""
    k, n = codes_kn.shape
    perm = gidx_sorted = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        natural = torch.arange(k, device=g_idx.device) // group
        if not torch.equal(g_idx, natural):
            order = torch.argsort(g_idx, stable=True)
            codes_kn = codes_kn[order]
            sorted_g = g_idx[order]
            perm = order.to(torch.int32)
            # After sorting, rows of group g are contiguous; the kernel can compute k // group only
            # when each group is exactly ``group`` rows starting at g * group.
            if not torch.equal(sorted_g, natural):
                gidx_sorted = sorted_g.to(torch.int32)
    return QuantWeight(FMT_INT4, pack_int4_cols(codes_kn).contiguous(), scales.contiguous(), k, n, group,
                       zeros=None if zeros is None else zeros.to(scales.dtype).contiguous(),
                       perm=perm, g_idx=gidx_sorted)


def dequantize(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[K, N]`` in ``dtype`` (rows in stored order: pair with ``w.perm``)."""
    if w.fmt == FMT_INT4:
        q = unpack_int4_cols(w.weight, INT4_ORDER).to(torch.float32)         # [K, N]
        rows = (torch.arange(w.k, device=q.device) // w.group) if w.g_idx is None else w.g_idx.long()
        s = w.scales.to(torch.float32)[rows]
        z = 8.0 if w.zeros is None else w.zeros.to(torch.float32)[rows]
        return ((q - z) * s).to(dtype)
    q = w.weight.to(torch.float32).t()                                          # [K, N]
    s = w.scales.to(torch.float32)
    s = s.repeat_interleave(w.group, 0)[:w.k].repeat_interleave(w.scale_bn, 1)[:, :w.n]
    return (q * s).to(dtype)


def quant_matmul_ref(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W) (+ bias)`` by dequantizing the whole weight (the CPU path)."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm.long())
    wd = dequantize(w, x.dtype)
    out = x @ wd
    return out if bias is None else out + bias


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

def _wq_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, gidx_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                    M, N, K, tiles_per_split, num_splits,
                    stride_xm, stride_wk, stride_wn, stride_sg, stride_sn, stride_om,
                    FMT: tl.constexpr, GROUP: tl.constexpr, SCALE_BN: tl.constexpr,
                    HAS_ZP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, SWAP: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_kb = tl.arange(0, BLOCK_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    s_cols = offs_n // SCALE_BN
    if FMT == 0:
        offs_nw = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        nw_ok = offs_nw < N // 8
        shifts = ((tl.arange(0, BLOCK_N) % 8) // 2 + (tl.arange(0, BLOCK_N) % 2) * 4) * 4    # INT4_ORDER
    if SWAP:    # out^T = W^T x^T: the dequantized tile is the MMA's A operand, which may stay in registers
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + offs_kb
        k_ok = offs_k < k_hi
        if HAS_PERM:
            xk = tl.load(perm_ptr + offs_k, mask=k_ok, other=0)
        else:
            xk = offs_k
        if FMT == 0:
            packed = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_nw[None, :],
                             mask=k_ok[:, None] & nw_ok[None, :], other=0)
            packed = tl.interleave(packed, packed)
            packed = tl.interleave(packed, packed)
            packed = tl.interleave(packed, packed)                       # [BLOCK_K, BLOCK_N]
            q = ((packed >> shifts[None, :]) & 0xF).to(tl.float32)
        else:
            q = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        if HAS_GIDX:
            g = tl.load(gidx_ptr + offs_k, mask=k_ok, other=0)
            sz_off = g[:, None] * stride_sg + s_cols[None, :] * stride_sn
            sz_mask = k_ok[:, None] & n_ok[None, :]
        else:
            g = k0 // GROUP
            sz_off = (g * stride_sg + s_cols * stride_sn)[None, :]
            sz_mask = n_ok[None, :]
        s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
        if FMT == 0:
            if HAS_ZP:
                z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
                w = (q - z) * s
            else:
                w = (q - 8.0) * s
        else:
            w = q * s
        if SWAP:
            xt = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + xk[:, None],
                         mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(tl.trans(w.to(xt.dtype)), xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(w.to(xt.dtype)), xt, acc)
        elif DOT:
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + xk[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        else:
            x1 = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + xk, mask=k_ok, other=0.0).to(tl.float32)
            acc += x1[:, None] * w
    if SWAP:
        res = tl.trans(acc)
    elif DOT:
        res = acc
    else:
        res = tl.sum(acc, 0)[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    o_off = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT:
        p_off = (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptr + p_off, res, mask=o_mask)
        tl.debug_barrier()
        cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for sp in range(0, num_splits):
                p_off = (sp * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
                total += tl.load(part_ptr + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + o_off, total.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + o_off, res.to(out_ptr.dtype.element_ty), mask=o_mask)


def _dequant_kernel(w_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, N, K,
                    stride_wk, stride_wn, stride_sg, stride_sn, stride_ok,
                    FMT: tl.constexpr, GROUP: tl.constexpr, SCALE_BN: tl.constexpr,
                    HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense ``[K, N]`` weight in the output dtype (rows in stored order), for cuBLAS at large M."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    n_ok = offs_n < N
    if FMT == 0:
        offs_nw = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        packed = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_nw[None, :],
                         mask=k_ok[:, None] & (offs_nw < N // 8)[None, :], other=0)
        packed = tl.interleave(packed, packed)
        packed = tl.interleave(packed, packed)
        packed = tl.interleave(packed, packed)
        shifts = ((tl.arange(0, BLOCK_N) % 8) // 2 + (tl.arange(0, BLOCK_N) % 2) * 4) * 4    # INT4_ORDER
        q = ((packed >> shifts[None, :]) & 0xF).to(tl.float32)
    else:
        q = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    if HAS_GIDX:
        g = tl.load(gidx_ptr + offs_k, mask=k_ok, other=0)
    else:
        g = offs_k // GROUP
    sz_off = g[:, None] * stride_sg + (offs_n // SCALE_BN)[None, :] * stride_sn
    mask = k_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + sz_off, mask=mask, other=0.0).to(tl.float32)
    if FMT == 0:
        if HAS_ZP:
            w = (q - tl.load(z_ptr + sz_off, mask=mask, other=0.0).to(tl.float32)) * s
        else:
            w = (q - 8.0) * s
    else:
        w = q * s
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * stride_ok + offs_n[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


def _w4_dequant_fn(p, s, z, magic, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BASE: tl.constexpr,
                   HAS_ZP: tl.constexpr, HALF_MATH: tl.constexpr):
    """int32 ``[BLOCK_K, BLOCK_N // 8]`` packed codes + scale/zero rows ``[BLOCK_N]`` -> ``[BLOCK_K, BLOCK_N]``
    weights in the scales' dtype (bf16/fp16).

    A packed word's nibbles ``j`` and ``j + 4`` (columns ``2j``, ``2j + 1``) land in the two 16-bit halves of
    ``(p >> 4j) & 0x000F000F``; OR-ing the exponent of ``2^7`` (bf16; ``2^10`` for fp16) makes two floats
    ``BASE + q`` without any int -> float conversion (``magic`` is a runtime value so the AND and OR fuse
    into one LOP3). Then ``w = (v - (BASE + z)) * s``: the subtraction is exact, the product rounds once,
    like the reference."""
    t0 = (p & 0x000F000F) | magic
    t1 = ((p >> 4) & 0x000F000F) | magic
    t2 = ((p >> 8) & 0x000F000F) | magic
    t3 = ((p >> 12) & 0x000F000F) | magic
    # [BLOCK_K, BLOCK_N // 8, 8] in column order: t_i's halves are columns 2i, 2i + 1 (INT4_ORDER). join(a, b)
    # adds a last axis; three give index 4 i0 + 2 i1 + i2 with i0 the first join's axis, so the last join
    # (low vs high half) is the pair inside one 32-bit register: no byte permutes (from the SASS).
    v = tl.join(tl.join(tl.join(t0.to(tl.int16), t2.to(tl.int16)), tl.join(t1.to(tl.int16), t3.to(tl.int16))),
                tl.join(tl.join((t0 >> 16).to(tl.int16), (t2 >> 16).to(tl.int16)),
                        tl.join((t1 >> 16).to(tl.int16), (t3 >> 16).to(tl.int16))))
    v = tl.reshape(v, [BLOCK_K, BLOCK_N])
    if HAS_ZP:
        zb = z.to(tl.float32) + BASE
    else:
        zb = tl.zeros([BLOCK_N], dtype=tl.float32) + (BASE + 8.0)
    if HALF_MATH:       # packed bf16x2 / f16x2 arithmetic on the GPU
        w = (v.to(s.dtype, bitcast=True) - zb.to(s.dtype)[None, :]) * s[None, :]
    else:               # the CPU interpreter has no bf16 arithmetic: the same values through fp32
        if s.dtype == tl.bfloat16:
            vf = (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            vf = v.to(s.dtype, bitcast=True).to(tl.float32)
        w = ((vf - zb[None, :]) * s.to(tl.float32)[None, :]).to(s.dtype)
    return w


_w4_dequant = DeviceFunction(_w4_dequant_fn) if HAS_TRITON else _w4_dequant_fn


def _w4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                    M, N, K, tiles_per_split, num_splits, magic,
                    stride_xm, stride_wk, stride_sg, stride_om,
                    BASE: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT: tl.constexpr, SWAP: tl.constexpr, HALF_MATH: tl.constexpr, AHEAD: tl.constexpr):
    """Batched W4A16 (bf16/fp16 activations, int4 weights whose groups are runs of GROUP rows; N % BLOCK_N
    == 0, BLOCK_K divides the group): a few bit operations per weight pair (``_w4_dequant``).

    The weight tile of step k + 1 is dequantized right after step k's MMA is issued, so the ALU work runs
    while the tensor cores do (from the sm_90 SASS: the dequantization sits between the HGMMA issues and
    their wait) when its packed codes, scales and zeros are loaded into registers one step ahead (``AHEAD=1``)
    or two (``AHEAD=2``: two steps per iteration, twice the pipelined ``x`` buffers); ``AHEAD=0`` leaves all
    loads to Triton's pipeline (``num_stages`` deep async copies: the most bytes in flight, measured faster
    at 16..256 rows on an H200 where the kernel is latency-bound); ``x`` always goes through it. Rows
    past ``M`` read row ``m % M`` (no masks in the loop). Program order puts the M tiles of one weight tile
    next to each other so they share its reads through L2."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    BW: tl.constexpr = BLOCK_N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m % M          # (not tl.minimum: that hides the rows' alignment and costs the async copies)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * BW + tl.arange(0, BW)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    n_tiles = tl.minimum(tiles_per_split, K // BLOCK_K - pid_k * tiles_per_split)
    offs_kb = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k_lo + offs_kb)[None, :]
    w_tile = w_ptr + offs_kb[:, None] * stride_wk + offs_w[None, :]
    if SWAP:    # out^T = W^T x^T (the weight tile as the MMA's first operand)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if AHEAD == 0:
        # Codes, scales and zeros loaded in the step that uses them: Triton pipelines them with x through
        # shared memory (``num_stages`` deep async copies), the most loads in flight.
        w_ptrs = w_tile + k_lo * stride_wk
        for kt in range(0, n_tiles):
            k0 = k_lo + kt * BLOCK_K
            x = tl.load(x_ptrs)
            p = tl.load(w_ptrs)
            s = tl.load(s_ptr + (k0 // GROUP) * stride_sg + offs_n)
            if HAS_ZP:
                z = tl.load(z_ptr + (k0 // GROUP) * stride_sg + offs_n)
            else:
                z = s
            w = _w4_dequant(p, s, z, magic, BLOCK_K, BLOCK_N, BASE, HAS_ZP, HALF_MATH)
            if SWAP:
                acc = tl.dot(tl.trans(w), tl.trans(x), acc)
            else:
                acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
    p0 = tl.load(w_tile + k_lo * stride_wk)
    s0 = tl.load(s_ptr + (k_lo // GROUP) * stride_sg + offs_n)
    if HAS_ZP:
        z0 = tl.load(z_ptr + (k_lo // GROUP) * stride_sg + offs_n)
    else:
        z0 = s0
    if AHEAD == 1:
        # Step k + 1's raw codes/scales/zeros are loaded right after step k's MMA is issued and dequantized
        # while it runs (the load latency is hidden by the MMA and by the SM's other programs).
        w = _w4_dequant(p0, s0, z0, magic, BLOCK_K, BLOCK_N, BASE, HAS_ZP, HALF_MATH)
        for kt in range(0, n_tiles):
            x = tl.load(x_ptrs)
            if SWAP:
                acc = tl.dot(tl.trans(w), tl.trans(x), acc)
            else:
                acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            ka = k_lo + tl.minimum(kt + 1, n_tiles - 1) * BLOCK_K
            pa = tl.load(w_tile + ka * stride_wk)
            sa = tl.load(s_ptr + (ka // GROUP) * stride_sg + offs_n)
            if HAS_ZP:
                za = tl.load(z_ptr + (ka // GROUP) * stride_sg + offs_n)
            else:
                za = sa
            w = _w4_dequant(pa, sa, za, magic, BLOCK_K, BLOCK_N, BASE, HAS_ZP, HALF_MATH)
    elif AHEAD == 2:
        # Two steps per iteration so the prefetched raw tiles alternate between two register sets (a loop-carried
        # rotation costs ~36 register moves a step). w: the next step's dequantized weights; p/s/z B: the raw
        # codes, scales and zeros of the step after it, loaded two steps ahead (indices clamped to the split's
        # last tile: no masks). An odd count runs one extra step whose x and scales read as zero.
        kb = k_lo + tl.minimum(1, n_tiles - 1) * BLOCK_K
        pb = tl.load(w_tile + kb * stride_wk)
        sb = tl.load(s_ptr + (kb // GROUP) * stride_sg + offs_n, mask=n_tiles > 1, other=0.0)
        if HAS_ZP:
            zb = tl.load(z_ptr + (kb // GROUP) * stride_sg + offs_n)
        else:
            zb = sb
        w = _w4_dequant(p0, s0, z0, magic, BLOCK_K, BLOCK_N, BASE, HAS_ZP, HALF_MATH)
        for kt in range(0, n_tiles, 2):
            x = tl.load(x_ptrs)
            if SWAP:
                acc = tl.dot(tl.trans(w), tl.trans(x), acc)
            else:
                acc = tl.dot(x, w, acc)
            ka = k_lo + tl.minimum(kt + 2, n_tiles - 1) * BLOCK_K
            pa = tl.load(w_tile + ka * stride_wk)
            sa = tl.load(s_ptr + (ka // GROUP) * stride_sg + offs_n)
            if HAS_ZP:
                za = tl.load(z_ptr + (ka // GROUP) * stride_sg + offs_n)
            else:
                za = sa
            w = _w4_dequant(pb, sb, zb, magic, BLOCK_K, BLOCK_N, BASE, HAS_ZP, HALF_MATH)
            x = tl.load(x_ptrs + BLOCK_K, mask=kt + 1 < n_tiles, other=0.0)
            if SWAP:
                acc = tl.dot(tl.trans(w), tl.trans(x), acc)
            else:
                acc = tl.dot(x, w, acc)
            kb = k_lo + tl.minimum(kt + 3, n_tiles - 1) * BLOCK_K
            pb = tl.load(w_tile + kb * stride_wk)
            sb = tl.load(s_ptr + (kb // GROUP) * stride_sg + offs_n, mask=kt + 3 < n_tiles, other=0.0)
            if HAS_ZP:
                zb = tl.load(z_ptr + (kb // GROUP) * stride_sg + offs_n)
            else:
                zb = sb
            w = _w4_dequant(pa, sa, za, magic, BLOCK_K, BLOCK_N, BASE, HAS_ZP, HALF_MATH)
            x_ptrs += 2 * BLOCK_K
    if SWAP:
        res = tl.trans(acc)
    else:
        res = acc
    m_ok = offs_m < M
    o_mask = m_ok[:, None]
    o_off = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT:
        # Every split stores an fp32 partial; the last to arrive for this tile adds them in split order.
        p_off = (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptr + p_off, res, mask=o_mask)
        tl.debug_barrier()
        cnt = cnt_ptr + pid
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for sp in range(0, num_splits):
                p_off = (sp * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
                total += tl.load(part_ptr + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
            tl.store(out_ptr + o_off, total.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        tl.store(out_ptr + o_off, res.to(out_ptr.dtype.element_ty), mask=o_mask)


def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, stride_wk, stride_sg, stride_ok, magic,
                       BASE: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HALF_MATH: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense ``[K, N]`` weight for cuBLAS at large M, through the W4A16 kernel's dequantization (no int ->
    float conversions; K % BLOCK_K == 0, N % BLOCK_N == 0, BLOCK_K inside one group)."""
    BW: tl.constexpr = BLOCK_N // 8
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BW + tl.arange(0, BW)
    p = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_w[None, :])
    g = (tl.program_id(0) * BLOCK_K) // GROUP
    s = tl.load(s_ptr + g * stride_sg + offs_n)
    if HAS_ZP:
        z = tl.load(z_ptr + g * stride_sg + offs_n)
    else:
        z = s
    w = _w4_dequant(p, s, z, magic, BLOCK_K, BLOCK_N, BASE, HAS_ZP, HALF_MATH)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * stride_ok + offs_n[None, :], w)


_wq_gemm = LazyKernel(_wq_gemm_kernel)
_w4_dequant_tiles = LazyKernel(_w4_dequant_kernel)
_w4_gemm = LazyKernel(_w4_gemm_kernel)
_dequant = LazyKernel(_dequant_kernel)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One launch shape; ``splits = 0`` picks split-K from ``target`` programs per SM; ``dequant``: cuBLAS."""

    block_m: int = 1
    block_n: int = 64
    block_k: int = 128
    splits: int = 0
    target: int = 4
    warps: int = 4
    stages: int = 3
    dequant: bool = False
    swap: bool = False         # compute out^T = W^T x^T (the dequantized weight as the MMA's A operand)
    w4: bool = False           # the batched W4A16 kernel (``_w4_gemm_kernel``) where ``w4_supported`` says so
    ahead: int = 0             # W4A16: codes loaded by Triton's pipeline (0) or 1 / 2 steps ahead in registers
    wgmma: bool = False        # W4A16 through the Gluon kernel (``w4_wgmma``, Hopper): ``stages`` = its ring depth
    ws: int = 0                # with ``wgmma``: warp-specialized (``w4_ws_launch``), this many dequantized tiles
    dq: int = 1                # ws: dequantization in PTX pair arithmetic (1) or Gluon's (0)
    persist: bool = False      # ws: one program per SM walking the work units (the persistent kernel)
    producers: int = 1         # ws persistent: producer (TMA + dequantization) warpgroups


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index or 0) if device.type == "cuda" else 4


def _rows_bucket(m: int) -> int:
    """Rows buckets the tuner keys on: powers of two up to 2048 (prefill chunks get their own choice between
    the fused kernel and dequantize + cuBLAS, which wins as M grows)."""
    return min(next_pow2(m), 2048)


def _candidates(m: int) -> list[Config]:
    """Launch shapes worth timing for ``m`` rows (decode-sized M is bound by weight reads, larger M by math).

    Wide tiles (256 outputs = one 128-byte line of a packed int4 row) read whole cache lines; split-K
    brings the program count to ``target`` per SM."""
    if m == 1:
        return [Config(1, 64, 128, target=4), Config(1, 128, 64, target=4), Config(1, 256, 32, target=4),
                Config(1, 256, 64, target=4, warps=8), Config(1, 128, 128, target=2, warps=8),
                Config(16, 128, 64, target=4), Config(16, 256, 64, target=4, warps=8)]
    if m <= 16:
        return [Config(16, 64, 128, target=4), Config(16, 128, 64, target=4), Config(16, 256, 64, target=4, warps=8),
                Config(16, 256, 32, target=4), Config(16, 64, 64, target=8, stages=4)]
    bm = next_pow2(m)
    if m <= 64:
        return [Config(bm, 64, 64, target=2), Config(bm, 128, 64, target=2), Config(bm, 256, 64, target=2, warps=8),
                Config(bm, 64, 128, target=1, stages=4), Config(bm, 128, 64, splits=1, warps=8),
                Config(bm, 128, 64, target=2, swap=True)]
    return [Config(64, 128, 64, splits=1, warps=4, stages=4), Config(128, 128, 64, splits=1, warps=8, stages=3),
            Config(128, 64, 64, splits=1, warps=4, stages=4), Config(128, 256, 64, splits=1, warps=8, stages=3),
            Config(64, 128, 64, target=2, warps=4, stages=4), Config(128, 128, 64, target=1, warps=8),
            Config(64, 128, 64, splits=1, warps=4, stages=4, swap=True),
            Config(128, 128, 64, splits=1, warps=8, stages=3, swap=True),
            Config(64, 256, 64, splits=1, warps=8, stages=3, swap=True), Config(dequant=True)]


def _w4_candidates(m: int) -> list[Config]:
    """Launch shapes of the batched W4A16 kernels for a rows bucket: the Triton kernel's (the first is its
    untuned default), then the Gluon kernels' (``_wgmma_candidates``, and ``_ws_candidates`` from 33 rows;
    Hopper only).

    From an H200 sweep (``benchmarks/gpu/bench_quant_gemm.py``, 2026-11-29): the Triton kernel is
    latency-bound rather than issue- or bandwidth-bound at 16..256 rows, so narrow tiles (BLOCK_N = 64,
    4 warps) with more programs per SM win everywhere but the widest projection, where 128-256 wide tiles
    that dequantize each weight tile once win, and BLOCK_K = 128 (half the steps) helps where the per-step
    latency dominates; at 1024 rows dequantize + cuBLAS wins. ``ahead=0`` (loads left to Triton's pipeline)
    and ``ahead=1`` (codes one step ahead in registers) are both offered; ``target`` adds split-K where
    output tiles alone leave SMs idle; ``swap`` (out^T = W^T x^T) lets 16..32 rows be the MMA's N."""
    if m <= 16:
        triton_cfgs = [Config(16, 64, 128, target=2, warps=4, stages=4, swap=True, w4=True),
                       Config(16, 64, 128, target=2, warps=8, stages=4, swap=True, w4=True),
                       Config(16, 64, 128, target=2, warps=4, stages=4, swap=True, w4=True, ahead=1),
                       Config(16, 64, 64, target=4, warps=4, stages=4, swap=True, w4=True)]
    elif m <= 32:
        triton_cfgs = [Config(32, 64, 128, target=2, warps=4, stages=4, swap=True, w4=True),
                       Config(32, 64, 128, target=2, warps=8, stages=4, swap=True, w4=True),
                       Config(32, 64, 64, target=4, warps=4, stages=4, swap=True, w4=True)]
    elif m <= 64:
        triton_cfgs = [Config(64, 64, 128, target=2, warps=8, stages=3, w4=True),
                       Config(64, 64, 64, target=2, warps=4, stages=4, w4=True),
                       Config(64, 128, 64, target=2, warps=4, stages=4, w4=True),
                       Config(64, 128, 128, target=2, warps=8, stages=3, w4=True)]
    elif m <= 128:
        triton_cfgs = [Config(128, 64, 64, target=1, warps=4, stages=4, w4=True),
                       Config(128, 64, 128, target=1, warps=8, stages=3, w4=True),
                       Config(128, 128, 128, target=1, warps=8, stages=2, w4=True),
                       Config(64, 64, 128, target=1, warps=8, stages=3, w4=True)]
    elif m <= 256:
        triton_cfgs = [Config(128, 64, 64, target=1, warps=4, stages=4, w4=True),
                       Config(128, 64, 128, target=1, warps=8, stages=3, w4=True),
                       Config(256, 128, 64, target=1, warps=8, stages=3, w4=True),
                       Config(256, 128, 64, target=1, warps=8, stages=3, w4=True, ahead=1)]
    else:
        triton_cfgs = [Config(dequant=True), Config(256, 128, 64, splits=1, warps=8, stages=4, w4=True),
                       Config(128, 128, 128, splits=1, warps=8, stages=2, w4=True)]
    return triton_cfgs + _wgmma_candidates(m) + (_ws_candidates(m) if m > 32 else [])


def _wgmma_candidates(m: int) -> list[Config]:
    """Shapes of the Gluon W4A16 kernel (``w4_wgmma``) per rows bucket. A warpgroup's MMA is 64 rows tall,
    so BLOCK_M >= 64, or ``swap`` puts the weight tile on that side and 16..32 rows of x on the MMA's N;
    ``stages`` is the depth of the cp.async ring, ``target`` the programs per SM that split-K aims for."""
    c = _wgmma_c
    # The first H200 sweep (2026-11-30) ran 3..4-deep rings; a CTA's time a K step tracked the load latency
    # divided by the ring's lookahead (stages - 1) rather than its MMA time (4 stages: 0.71 us a step, 3 stages:
    # 1.14 us at 1024 rows), so the deeper rings that still fit shared memory are offered next to the table's.
    if m <= 32:     # swap: out^T = W^T x^T, x's rows are the MMA's N (16 or 32), no 64-row padding
        bm = 16 if m <= 16 else 32
        return [c(bm, 128, 128, 3, 4, target=2, swap=True), c(bm, 64, 64, 6, 4, target=3, swap=True),
                c(bm, 128, 64, 8, 4, target=2, swap=True), c(bm, 128, 128, 5, 4, target=2, swap=True)]
    if m <= 64:
        return [c(64, 128, 64, 4, 4, target=2), c(64, 128, 64, 6, 4, target=2), c(64, 128, 64, 8, 4, target=2),
                c(64, 64, 64, 6, 4, target=3)]
    if m <= 128:
        return [c(128, 128, 64, 4, 8, target=1), c(128, 128, 64, 8, 8, target=1), c(64, 128, 64, 6, 4, target=2),
                c(128, 64, 64, 4, 4, target=2)]
    if m <= 256:
        return [c(256, 128, 64, 3, 8, target=1), c(256, 128, 64, 5, 8, target=1), c(128, 256, 64, 6, 8, target=1),
                c(128, 128, 64, 8, 8, target=1)]
    return [c(256, 128, 64, 5, 8, splits=1), c(128, 256, 64, 6, 8, splits=1), c(128, 128, 64, 8, 8, splits=1),
            c(256, 128, 64, 3, 8, splits=1), c(128, 128, 64, 5, 8, splits=1)]


def w4_supported(x: torch.Tensor, w: QuantWeight, cfg: Config | None = None) -> bool:
    """Whether ``_w4_gemm_kernel`` handles ``x @ w`` (with ``cfg``'s tile): int4 whose groups are runs of
    ``group`` stored rows (act-order is fine: ``x``'s columns are gathered first), fp16/bf16 activations with
    scales and zeros of the same dtype (the layers store them so), whole groups, N a multiple of the tile
    width and contiguous packed rows."""
    if w.fmt != FMT_INT4 or w.g_idx is not None or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    block_n = cfg.block_n if cfg is not None else 64
    if cfg is not None and cfg.wgmma and (cfg.block_m < (16 if cfg.swap else 64) or w.k % cfg.block_k
                                          or w.group % cfg.block_k
                                          or not _aligned16(x if w.perm is None else None, w.scales, w.zeros)):
        return False
    if cfg is not None and cfg.ws and (cfg.block_m != 16 * cfg.warps or cfg.block_k * x.element_size() > 128
                                       or cfg.block_n // 8 * 4 > 128 or not _aligned16(w.weight)
                                       or (cfg.producers > 1 and (cfg.stages % 2 or cfg.ws % 2))):
        return False    # one 64-row consumer warpgroup per 4 warps; TMA boxes within a 128-byte swizzle row
    return (w.k % w.group == 0 and w.group % 16 == 0 and w.n % block_n == 0 and w.weight.stride(1) == 1
            and w.scales.dtype == x.dtype and w.scales.stride(1) == 1
            and (w.zeros is None or (w.zeros.stride() == w.scales.stride() and w.zeros.dtype == x.dtype)))


def _aligned16(*ts: torch.Tensor | None) -> bool:
    """Rows start on 16 bytes (base and row stride): the Gluon kernels copy them with 16-byte cp.async, which
    Triton only emits when it can prove that alignment (it fails to compile narrower half copies)."""
    return all(t is None or (t.data_ptr() % 16 == 0 and (t.dim() < 2 or t.stride(0) * t.element_size() % 16 == 0))
               for t in ts)


def _candidates_for(m: int, x: torch.Tensor, w: QuantWeight) -> list[Config]:
    """What the tuner (``APHRODITE_QUANT_TUNE=1``) times for ``m`` rows: the general kernel's shapes plus the
    W4A16 kernel's where it applies (``APHRODITE_W4A16=0``: not offered)."""
    cands = _candidates(m)
    if m > 1 and _w4_enabled():
        cands = cands + [c for c in _w4_candidates(m) if not c.dequant and w4_supported(x, w, c)
                         and (not c.wgmma or wgmma_supported(x.device))]
        if not any(c.dequant for c in cands) and m > 256:
            cands.append(Config(dequant=True))
    return cands


def _w4_enabled() -> bool:
    return os.environ.get("APHRODITE_W4A16", "1").strip().lower() not in ("0", "false", "no")


def _w4_table(m: int, n: int) -> Config:
    """The W4A16 shape the engine dispatches for ``m`` rows (5..256) and ``n`` outputs: the fastest of each
    rows bucket in the H200 sweep of Llama-3.1-8B's projections (2026-11-29, ``bench_quant_gemm.py``), with
    the widest projection (gate_up, N >= 16384) on its own column. One shape per cell keeps the kernels the
    engine can meet few, so warm-up and graph capture compile all of them."""
    wide = n >= 16384
    if m <= 16:
        return Config(16, 64, 128, target=2, warps=4, stages=4, swap=True, w4=True)
    if m <= 64:
        return (Config(64, 128, 64, target=2, warps=4, stages=4, w4=True) if wide
                else Config(64, 64, 64, target=2, warps=4, stages=4, w4=True))
    if m <= 128:
        return (Config(128, 128, 128, target=1, warps=8, stages=2, w4=True) if wide
                else Config(128, 64, 64, target=1, warps=4, stages=4, w4=True))
    return (Config(256, 128, 64, target=1, warps=8, stages=3, w4=True) if wide
            else Config(128, 64, 64, target=1, warps=4, stages=4, w4=True))


def _wgmma_c(bm: int, bn: int, bk: int, stages: int, warps: int, target: int = 1, splits: int = 0,
             swap: bool = False, ws: int = 0, dq: int = 1, persist: bool = False, producers: int = 1) -> Config:
    return Config(bm, bn, bk, splits=splits, target=target, warps=warps, stages=stages, w4=True, wgmma=True,
                  swap=swap, ws=ws, dq=dq, persist=persist, producers=producers)


def _ws_candidates(m: int) -> list[Config]:
    """Shapes of the warp-specialized Gluon W4A16 kernel (``w4_ws_launch``) per rows bucket (64+): ``warps``
    consumer warps (64 rows a warpgroup, so ``block_m = 16 * warps``), a ``stages``-deep TMA ring, ``ws``
    dequantized tiles, ``persist`` the persistent form; every shape fits an H200's 227 KB of shared memory.
    ``dq=0`` (Gluon's dequantization arithmetic instead of the PTX pair form) is offered as a cross-check.
    Not in the default tables: the first H200 sweep (``bench_w4_gemm.py``, 2026-11-30) measured them correct
    but at 0.5-0.7x bf16 (gate_up at 1024 rows: 532 us vs 385 for dequantize + cuBLAS), with the producer's
    scale loads in front of its fence (~2200 cycles a K step); that order is fixed since, unmeasured."""
    c = _wgmma_c
    if m <= 64:
        return [c(64, 128, 64, 6, 4, target=2, ws=3), c(64, 256, 64, 4, 4, target=2, ws=2),
                c(64, 128, 64, 6, 4, target=2, ws=3, persist=True)]
    if m <= 128:
        return [c(128, 128, 64, 6, 8, target=1, ws=3), c(64, 128, 64, 6, 4, target=2, ws=3),
                c(128, 256, 64, 4, 8, target=1, ws=2, persist=True)]
    if m <= 256:
        return [c(128, 256, 64, 4, 8, target=1, ws=2), c(128, 128, 64, 6, 8, target=1, ws=3),
                c(128, 256, 64, 4, 8, target=1, ws=2, persist=True)]
    return [c(128, 256, 64, 4, 8, splits=1, ws=2), c(128, 256, 64, 4, 8, splits=1, ws=3),
            c(128, 256, 64, 4, 8, splits=1, ws=2, persist=True), c(128, 128, 64, 6, 8, splits=1, ws=3, persist=True),
            c(128, 256, 64, 4, 8, splits=1, ws=2, dq=0),
            c(128, 128, 64, 6, 8, splits=1, ws=4, persist=True, producers=2)]


#: The Gluon wgmma W4A16 shape the engine dispatches on sm_90, per rows bucket: (N < 16384, N >= 16384 i.e.
#: gate_up); None keeps the Triton table / dequantize + cuBLAS. From ``benchmarks/gpu/bench_w4_wgmma.py`` on an
#: H200 (2026-11-30, Llama-3.1-8B projections, us): at 16 rows the swap form beats both bf16 and the Triton
#: kernel on every projection (qkv 13.0 vs 16.5 Triton / 16.8 bf16, o 11.2 / 11.7, gate_up 45.9 / 50.3, down
#: 30.8 / 31.0); at 64..256 rows it wins on gate_up only (64: 66.8 vs 93.9, 128: 90.2 vs 151.7, 256: 137.7 vs
#: 190.9), the narrower projections having too few output tiles; from 512 rows dequantize + cuBLAS wins
#: (1024: 0.79x bf16 vs 0.64x). The 8-row bucket runs the 16-row shape (the same weight-bound work).
_WGMMA_TABLE: dict[int, tuple[Config | None, Config | None]] = {
    8: (_wgmma_c(16, 128, 128, 3, 4, target=2, swap=True), _wgmma_c(16, 128, 128, 3, 4, target=2, swap=True)),
    16: (_wgmma_c(16, 128, 128, 3, 4, target=2, swap=True), _wgmma_c(16, 128, 128, 3, 4, target=2, swap=True)),
    64: (None, _wgmma_c(64, 128, 64, 4, 4, target=2)),
    128: (None, _wgmma_c(128, 128, 64, 4, 8, target=1)),
    256: (None, _wgmma_c(256, 128, 64, 3, 8, target=1)),
}


def _wgmma_table(m: int, n: int) -> Config | None:
    cell = _WGMMA_TABLE.get(_rows_bucket(m))
    if cell is None:
        return None
    return cell[1] if n >= 16384 else cell[0]


def _dequant_rows(m: int, n: int) -> bool:
    """Whether dequantize + cuBLAS is the GPU default for ``m`` rows and ``n`` outputs (where no Gluon table
    cell applies): above 256 rows, and above 192 on the narrower projections. From the H200 sweep
    (``bench_w4_gemm.py``, 2026-11-30, Llama-3.1-8B): at 512 and 1024 rows it is the fastest int4 path on every
    projection (0.62-0.81x bf16; the fused kernels reach 0.5-0.7x); at 256 rows it beats the Triton W4A16
    kernel on qkv (41.8 vs 50.9 us), o (27.7 vs 32.6) and down (92.6 vs 93.1) while gate_up keeps the Gluon
    kernel (136.8 vs 175.0). Its cost is a fixed weight pass (~19 us on qkv, ~45 on down), so at 128 rows the
    Triton kernel still wins (down 65.8 vs ~82): the crossover, from both sweeps, is ~170-190 rows."""
    return m > 256 or (m > 192 and n < 16384)


def _default_config(m: int, x: torch.Tensor, w: QuantWeight) -> Config:
    """What runs without the tuner (the engine's default): on sm_90 the Gluon wgmma kernel where its table has
    the rows bucket; else dequantize + cuBLAS where ``_dequant_rows`` says so (GPU), the W4A16 table where that
    kernel applies (``APHRODITE_W4A16=0``: neither), else the general kernel's first shape."""
    if m > 1 and _w4_enabled() and x.device.type == "cuda":
        cfg = _wgmma_table(m, w.n)
        if cfg is not None and w4_supported(x, w, cfg) and wgmma_supported(x.device):
            return cfg
    if x.device.type == "cuda" and _dequant_rows(m, w.n):
        return Config(dequant=True)
    if m > 1 and _w4_enabled():
        cfg = _w4_table(m, w.n)
        if w4_supported(x, w, cfg):
            return cfg
    return _candidates(m)[0]


_TUNED: dict[tuple, Config] = {}


def _tuning_enabled() -> bool:
    """``APHRODITE_QUANT_TUNE=1`` times candidate shapes the first time each (rows bucket, N, K) runs. Off by
    default: in an engine that means Triton compiles in the middle of serving (minutes on a fresh machine);
    the fixed tables below are what the engine dispatches, the GPU benchmarks turn tuning on to refresh them."""
    return os.environ.get("APHRODITE_QUANT_TUNE", "0").strip().lower() in ("1", "true", "yes")


def _splits(cfg: Config, m: int, n: int, k: int, device: torch.device) -> int:
    k_tiles = cdiv(k, cfg.block_k)
    if cfg.splits:
        return max(1, min(cfg.splits, k_tiles))
    tiles = cdiv(n, cfg.block_n) * cdiv(m, max(cfg.block_m, 1))
    want = cdiv(cfg.target * _num_sms(device), tiles)
    return max(1, min(want, k_tiles, 64))


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed per-tile arrival counters, re-armed by the kernel. Allocated once, large, so CUDA-graph
    capture never has to grow them."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("quantized matmul counters would grow during CUDA-graph capture")
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _check_group(w: QuantWeight, block_k: int) -> int:
    """BLOCK_K must stay inside one scale group unless rows carry their own group index."""
    if w.g_idx is not None:
        return block_k
    while block_k > 16 and w.group % block_k:
        block_k //= 2
    if w.group % block_k:
        raise ValueError(f"group size {w.group} is not a multiple of 16")
    return block_k


def _launch(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, out: torch.Tensor, cfg: Config) -> None:
    m, k = x.shape
    n = w.n
    dev = x.device
    if cfg.dequant:
        wd = torch.empty((k, n), dtype=x.dtype, device=dev)
        if w4_supported(x, w):
            _launch_w4_dequant(w, wd)
        else:
            _launch_dequant(w, wd)
        xs = x if w.perm is None else x.index_select(1, w.perm.long())
        if bias is None:
            torch.mm(xs, wd, out=out)
        else:
            torch.addmm(bias, xs, wd, out=out)
        return
    if cfg.w4 and w4_supported(x, w, cfg) and (not cfg.wgmma or wgmma_supported(dev)):
        _launch_w4(x, w, bias, out, cfg)
        return
    block_k = _check_group(w, cfg.block_k)
    dot = cfg.block_m > 1
    block_m = max(16, cfg.block_m) if dot else 1
    splits = _splits(cfg, m, n, k, dev)
    k_tiles = cdiv(k, block_k)
    tiles_per_split = cdiv(k_tiles, splits)
    splits = cdiv(k_tiles, tiles_per_split)
    grid = (cdiv(n, cfg.block_n), cdiv(m, block_m), splits)
    if splits > 1:
        part = torch.empty((splits, m, n), dtype=torch.float32, device=dev)
        cnt = _counters(dev, grid[0] * grid[1])
    else:
        part = cnt = out
    if w.fmt == FMT_INT4:
        stride_wk, stride_wn = w.weight.stride(0), 1
    else:
        stride_wk, stride_wn = w.weight.stride(1), w.weight.stride(0)
    sg = w.scales.stride(0) if w.scales.shape[0] > 1 else 0
    dummy = w.scales
    _wq_gemm(dev)[grid](
        x, w.weight, w.scales, w.zeros if w.zeros is not None else dummy,
        w.perm if w.perm is not None else dummy, w.g_idx if w.g_idx is not None else dummy,
        bias if bias is not None else dummy, out, part, cnt,
        m, n, k, tiles_per_split, splits,
        x.stride(0), stride_wk, stride_wn, sg, w.scales.stride(1), out.stride(0),
        FMT=w.fmt, GROUP=w.group if w.fmt == FMT_INT4 or w.scales.shape[0] > 1 else block_k,
        SCALE_BN=w.scale_bn, HAS_ZP=w.zeros is not None, HAS_PERM=w.perm is not None,
        HAS_GIDX=w.g_idx is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT=splits > 1, DOT=dot, SWAP=cfg.swap and dot,
        IEEE=x.dtype == torch.float32, num_warps=cfg.warps, num_stages=cfg.stages)


#: (magic exponent bits OR-ed over two nibbles, the float those bits make with a zero nibble) per dtype
_W4_MAGIC = {torch.bfloat16: (0x43004300, 128.0), torch.float16: (0x64006400, 1024.0)}


def _launch_w4(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, out: torch.Tensor, cfg: Config) -> None:
    if w.perm is not None:     # act-order: one gather of x's columns into stored-row order (M x K, small)
        x = x.index_select(1, w.perm.long())
    m, k = x.shape
    n = w.n
    dev = x.device
    block_m = max(16, cfg.block_m)
    block_k = _check_group(w, cfg.block_k)      # a power of two inside one group
    if cfg.ws and not cfg.splits:
        # One program per SM (its rings fill shared memory): split-K rounds down so the last wave stays whole.
        tiles = cdiv(n, cfg.block_n) * cdiv(m, block_m)
        splits = max(1, min(cfg.target * _num_sms(dev) // tiles, k // block_k, 64))
        if cfg.persist:
            while (k // block_k) % splits:      # every unit the same number of K steps
                splits -= 1
    else:
        splits = _splits(Config(block_m, cfg.block_n, block_k, cfg.splits, cfg.target), m, n, k, dev)
    k_tiles = k // block_k
    tiles_per_split = cdiv(k_tiles, splits)
    splits = cdiv(k_tiles, tiles_per_split)
    grid = (cdiv(n, cfg.block_n) * cdiv(m, block_m), splits)
    if splits > 1:
        part = torch.empty((splits, m, n), dtype=torch.float32, device=dev)
        cnt = _counters(dev, grid[0])
    else:
        part = cnt = out
    magic, base = _W4_MAGIC[x.dtype]
    if cfg.wgmma and cfg.ws:
        w4_ws_launch(x, w.weight, w.scales, w.zeros, bias, out, part if splits > 1 else None,
                     cnt if splits > 1 else None, k=k, n=n, group=w.group, magic=magic, base=base,
                     block_m=block_m, block_n=cfg.block_n, block_k=block_k, stages=cfg.stages, nb=cfg.ws,
                     warps=cfg.warps, splits=splits, tiles_per_split=tiles_per_split, dq=cfg.dq,
                     programs=_num_sms(dev) if cfg.persist else 0, producers=cfg.producers)
        return
    if cfg.wgmma:
        w4_wgmma_launch(x, w.weight, w.scales, w.zeros, bias, out, part if splits > 1 else None,
                        cnt if splits > 1 else None, k=k, n=n, group=w.group, magic=magic, base=base,
                        block_m=block_m, block_n=cfg.block_n, block_k=block_k, stages=cfg.stages, warps=cfg.warps,
                        splits=splits, tiles_per_split=tiles_per_split, swap=cfg.swap)
        return
    dummy = w.scales
    _w4_gemm(dev)[grid](
        x, w.weight, w.scales, w.zeros if w.zeros is not None else dummy, bias if bias is not None else dummy,
        out, part, cnt, m, n, k, tiles_per_split, splits, magic,
        x.stride(0), w.weight.stride(0), w.scales.stride(0), out.stride(0), BASE=base,
        GROUP=w.group, HAS_ZP=w.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT=splits > 1, SWAP=cfg.swap,
        HALF_MATH=x.is_cuda, AHEAD=cfg.ahead, num_warps=cfg.warps, num_stages=cfg.stages)


def _launch_w4_dequant(w: QuantWeight, out: torch.Tensor) -> None:
    k, n = out.shape
    bk = _check_group(w, 32)
    bn = 128 if n % 128 == 0 else 64
    magic, base = _W4_MAGIC[out.dtype]
    _w4_dequant_tiles(out.device)[(k // bk, n // bn)](
        w.weight, w.scales, w.zeros if w.zeros is not None else w.scales, out,
        w.weight.stride(0), w.scales.stride(0), out.stride(0), magic, BASE=base, GROUP=w.group,
        HAS_ZP=w.zeros is not None, HALF_MATH=out.is_cuda, BLOCK_K=bk, BLOCK_N=bn, num_warps=4)


def _launch_dequant(w: QuantWeight, out: torch.Tensor) -> None:
    k, n = out.shape
    bk, bn = 32, 128
    if w.fmt == FMT_INT4:
        stride_wk, stride_wn = w.weight.stride(0), 1
    else:
        stride_wk, stride_wn = w.weight.stride(1), w.weight.stride(0)
    sg = w.scales.stride(0) if w.scales.shape[0] > 1 else 0
    dummy = w.scales
    _dequant(out.device)[(cdiv(k, bk), cdiv(n, bn))](
        w.weight, w.scales, w.zeros if w.zeros is not None else dummy, w.g_idx if w.g_idx is not None else dummy,
        out, n, k, stride_wk, stride_wn, sg, w.scales.stride(1), out.stride(0),
        FMT=w.fmt, GROUP=w.group, SCALE_BN=w.scale_bn, HAS_ZP=w.zeros is not None, HAS_GIDX=w.g_idx is not None,
        BLOCK_K=bk, BLOCK_N=bn, num_warps=4)


def _time(fn, reps: int = 10) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph of ``reps`` calls, as decode runs it: a
    Triton launch from Python costs more than many of these kernels take, so eager timing would rank
    launch overhead. Falls back to eager timing where capture fails."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        start.record()
        graph.replay()
        end.record()
    except RuntimeError:
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _config_for(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None) -> Config:
    m = x.shape[0]
    key = (w.fmt, _rows_bucket(m), w.n, w.k, x.dtype, w.zeros is not None, w.perm is not None,
           w.g_idx is not None, w.scale_bn)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    dev = x.device
    if dev.type != "cuda" or not _tuning_enabled() or torch.cuda.is_current_stream_capturing() or deferring():
        return _default_config(m, x, w)   # (no timing while compiles are deferred: launches may be skipped)
    rows = _rows_bucket(m)
    xs = torch.randn((rows, w.k), dtype=x.dtype, device=dev)
    scratch = torch.empty((rows, w.n), dtype=x.dtype, device=dev)
    best, best_ms = None, float("inf")
    for cand in _candidates_for(rows, x, w):
        try:
            ms = _time(lambda c=cand: _launch(xs, w, bias, scratch, c))
        except Exception:   # a shape the compiler rejects (e.g. out of shared memory) is just skipped
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    cfg = best or _default_config(m, x, w)
    _TUNED[key] = cfg
    return cfg


def tuned_configs() -> dict[tuple, Config]:
    """What the tuner chose so far (printed by the GPU benchmark)."""
    return dict(_TUNED)


def quant_matmul(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None,
                 config: Config | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W) (+ bias) -> [M, N]`` in ``x``'s dtype: the Triton kernel on CUDA (and under
    ``TRITON_INTERPRET``), else ``quant_matmul_ref``."""
    if not use_triton(x):
        return quant_matmul_ref(x, w, bias)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((x.shape[0], w.n), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    if x.is_cuda and config is None and x.shape[0] <= 4:     # decode: the GEMV (APHRODITE_QUANT_GEMV=old: off)
        from aphrodite.kernels import quant_gemv
        if quant_gemv.gemv_enabled() and quant_gemv.supports(x, w):
            return quant_gemv.quant_gemv(x, w, bias, out)
    _launch(x, w, bias, out, config or _config_for(x, w, bias))
    return out
