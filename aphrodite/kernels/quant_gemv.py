"""Quantized GEMV for decode (1..4 rows): ``y = x @ dequant(W)`` bound by reading the weight, not by ALU work.

The general kernel in ``int4_matmul`` expands each int4 tile with interleaves, converts every nibble with an
integer-to-float instruction and applies the scale and zero per element; at batch 1 that keeps it near
0.9 TB/s on an H200. This kernel does the least work per weight element:

* int4 (canonical layout ``[K, N // 8]``): the eight nibble positions of a packed word are handled as eight
  planes (plane ``j`` holds outputs ``8w + INT4_ORDER[j]``). A shift and one mask-or (1.0's exponent over
  the nibble placed in mantissa bits 12..15 or 16..19) give the float ``f = 1 + q * 2^-e`` directly from the bits:
  no interleave and no int->float conversion. Several rows: with ``a = s * 2^e`` and ``b = -(a + s z)``
  (once per group and output) ``w = a f + b = s (q - z)`` is one FMA shared by the rows, then one FMA per
  row. One row: ``G = sum x f`` and ``X = sum x`` per group and ``acc += a G + b X`` at the group's end,
  so each element costs a shift, a mask-or and one FMA. Accumulators keep the tile's shape, so the
  reduction over K (shuffles) runs once per program.
* FP8 ``[N, K]`` (K contiguous): a program owns ``BLOCK_N`` output features and reads their rows along K;
  fp8 -> fp32 and one FMA per element and row; a per-channel scale is applied once at the end, a block
  scale (128 x 128) multiplies the tile's ``x`` slice.

Both split K so that there are a few programs per SM; with several splits every program stores an fp32
partial and the last to arrive (an arrival counter per output tile, re-armed by that program, so the
launch is CUDA-graph safe and the sum order is fixed: deterministic) adds them in split order, adds the
bias and writes the output. Act-order int4 (``perm``/``g_idx``) and K not a multiple of the group fall back
to ``int4_matmul``'s kernel (``supports`` says which). A few launch shapes are timed per (format, rows, N,
K) the first time one runs on CUDA outside graph capture when ``APHRODITE_QUANT_TUNE=1``, like
``int4_matmul``'s tuner; by default the first candidate runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from aphrodite.kernels.gemv_gluon import (
    gemv_fp8_launch,
    gemv_fp8_supported,
    gemv_w4_launch,
    gemv_w4_supported,
    gemv_w4v2_launch,
    gemv_w4v2_supported,
)
from aphrodite.kernels.int4_matmul import (
    FMT_FP8,
    FMT_INT4,
    QuantWeight,
    _aligned16,
    _counters,
    _num_sms,
    _time,
    _tuning_enabled,
)
from aphrodite.kernels.triton_utils import LazyKernel, cdiv, tl
from aphrodite.kernels.w4_wgmma import wgmma_supported

__all__ = ["GemvConfig", "MAX_ROWS", "gemv_enabled", "quant_gemv", "supports", "tuned_gemv_configs"]

MAX_ROWS = 4


def gemv_enabled() -> bool:
    """``APHRODITE_QUANT_GEMV``: "new" (default) uses this kernel for 1..4 rows, "old" the general one."""
    mode = os.environ.get("APHRODITE_QUANT_GEMV", "new").strip().lower()
    if mode not in ("new", "old"):
        raise ValueError(f"APHRODITE_QUANT_GEMV must be 'new' or 'old', got {mode!r}")
    return mode == "new"


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

def _gemv_int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                      M, N, NW, groups_per_split, num_groups, num_splits, one,
                      stride_xm, stride_wk, stride_sg, stride_om,
                      ROWS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_W: tl.constexpr, SPLIT: tl.constexpr,
                      DEFER: tl.constexpr):
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = offs_w < NW
    offs_kb = tl.arange(0, BLOCK_K)
    g_lo = pid_k * groups_per_split
    g_hi = tl.minimum(num_groups, g_lo + groups_per_split)
    zero = tl.zeros([BLOCK_K, BLOCK_W], dtype=tl.float32)
    acc0 = (zero, zero, zero, zero, zero, zero, zero, zero)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    w_cols = offs_w[None, :]
    for g in range(g_lo, g_hi):
        # Per output: a = 16 s and b = -s (16 + z), so that a (1 + q/16) + b = s (q - z).
        s_base = s_ptr + g * stride_sg + offs_w * 8
        if EVEN_W:
            s0 = tl.load(s_base + 0).to(tl.float32)
            s1 = tl.load(s_base + 2).to(tl.float32)
            s2 = tl.load(s_base + 4).to(tl.float32)
            s3 = tl.load(s_base + 6).to(tl.float32)
            s4 = tl.load(s_base + 1).to(tl.float32)
            s5 = tl.load(s_base + 3).to(tl.float32)
            s6 = tl.load(s_base + 5).to(tl.float32)
            s7 = tl.load(s_base + 7).to(tl.float32)
        else:
            s0 = tl.load(s_base + 0, mask=w_ok, other=0.0).to(tl.float32)
            s1 = tl.load(s_base + 2, mask=w_ok, other=0.0).to(tl.float32)
            s2 = tl.load(s_base + 4, mask=w_ok, other=0.0).to(tl.float32)
            s3 = tl.load(s_base + 6, mask=w_ok, other=0.0).to(tl.float32)
            s4 = tl.load(s_base + 1, mask=w_ok, other=0.0).to(tl.float32)
            s5 = tl.load(s_base + 3, mask=w_ok, other=0.0).to(tl.float32)
            s6 = tl.load(s_base + 5, mask=w_ok, other=0.0).to(tl.float32)
            s7 = tl.load(s_base + 7, mask=w_ok, other=0.0).to(tl.float32)
        # Plane j's float is 1 + q * 2^-11 (nibble at mantissa bits 12..15: j = 0, 2, 3, 5, 7) or 1 + q * 2^-7
        # (bits 16..19: j = 1, 4, 6); with a = s * 2^11 (2^7) and b = -(a + s z) one FMA gives s (q - z),
        # exactly for fp16/bf16 scales (s * (2^11 + z) fits fp32's mantissa).
        if HAS_ZP:
            z_base = z_ptr + g * stride_sg + offs_w * 8
            z0 = tl.load(z_base + 0, mask=w_ok, other=0.0).to(tl.float32)
            z1 = tl.load(z_base + 2, mask=w_ok, other=0.0).to(tl.float32)
            z2 = tl.load(z_base + 4, mask=w_ok, other=0.0).to(tl.float32)
            z3 = tl.load(z_base + 6, mask=w_ok, other=0.0).to(tl.float32)
            z4 = tl.load(z_base + 1, mask=w_ok, other=0.0).to(tl.float32)
            z5 = tl.load(z_base + 3, mask=w_ok, other=0.0).to(tl.float32)
            z6 = tl.load(z_base + 5, mask=w_ok, other=0.0).to(tl.float32)
            z7 = tl.load(z_base + 7, mask=w_ok, other=0.0).to(tl.float32)
        else:
            z0 = 8.0
            z1 = 8.0
            z2 = 8.0
            z3 = 8.0
            z4 = 8.0
            z5 = 8.0
            z6 = 8.0
            z7 = 8.0
        if DEFER:
            # Scales once per group: G_j = sum_k x f_j over the group (f = 1 + q/128, nibble at bits 16..19),
            # X = sum_k x, then acc_j += a_j G_j + b_j X with a = 128 s, b = -s (128 + z): one FMA per element.
            g0 = (zero, zero, zero, zero, zero, zero, zero, zero)
            g1 = g0
            xs0 = tl.zeros([BLOCK_K, 1], dtype=tl.float32)
            xs1 = xs0
            for kk in tl.static_range(GROUP // BLOCK_K):
                offs_k = g * GROUP + kk * BLOCK_K + offs_kb
                w_off = offs_k[:, None].to(tl.int64) * stride_wk + w_cols
                if EVEN_W:
                    p = tl.load(w_ptr + w_off)
                else:
                    p = tl.load(w_ptr + w_off, mask=w_ok[None, :], other=0)
                lo = p << 12
                hi = p >> 8
                f0 = (((p << 16) & 0xF0000) | one).to(tl.float32, bitcast=True)
                f1 = ((lo & 0xF0000) | one).to(tl.float32, bitcast=True)
                f2 = (((p << 8) & 0xF0000) | one).to(tl.float32, bitcast=True)
                f3 = (((p << 4) & 0xF0000) | one).to(tl.float32, bitcast=True)
                f4 = ((p & 0xF0000) | one).to(tl.float32, bitcast=True)
                f5 = (((p >> 4) & 0xF0000) | one).to(tl.float32, bitcast=True)
                f6 = ((hi & 0xF0000) | one).to(tl.float32, bitcast=True)
                f7 = (((p >> 12) & 0xF0000) | one).to(tl.float32, bitcast=True)
                x0 = tl.load(x_ptr + offs_k).to(tl.float32)[:, None]
                xs0 += x0
                g0 = (g0[0] + x0 * f0, g0[1] + x0 * f1, g0[2] + x0 * f2, g0[3] + x0 * f3,
                      g0[4] + x0 * f4, g0[5] + x0 * f5, g0[6] + x0 * f6, g0[7] + x0 * f7)
                if ROWS > 1:
                    x1 = tl.load(x_ptr + stride_xm + offs_k).to(tl.float32)[:, None]
                    xs1 += x1
                    g1 = (g1[0] + x1 * f0, g1[1] + x1 * f1, g1[2] + x1 * f2, g1[3] + x1 * f3,
                          g1[4] + x1 * f4, g1[5] + x1 * f5, g1[6] + x1 * f6, g1[7] + x1 * f7)
            a = ((s0 * 128.0)[None, :], (s1 * 128.0)[None, :], (s2 * 128.0)[None, :], (s3 * 128.0)[None, :],
                 (s4 * 128.0)[None, :], (s5 * 128.0)[None, :], (s6 * 128.0)[None, :], (s7 * 128.0)[None, :])
            b = ((s0 * -z0)[None, :] - a[0], (s1 * -z1)[None, :] - a[1], (s2 * -z2)[None, :] - a[2],
                 (s3 * -z3)[None, :] - a[3], (s4 * -z4)[None, :] - a[4], (s5 * -z5)[None, :] - a[5],
                 (s6 * -z6)[None, :] - a[6], (s7 * -z7)[None, :] - a[7])
            acc0 = (acc0[0] + a[0] * g0[0] + b[0] * xs0, acc0[1] + a[1] * g0[1] + b[1] * xs0,
                    acc0[2] + a[2] * g0[2] + b[2] * xs0, acc0[3] + a[3] * g0[3] + b[3] * xs0,
                    acc0[4] + a[4] * g0[4] + b[4] * xs0, acc0[5] + a[5] * g0[5] + b[5] * xs0,
                    acc0[6] + a[6] * g0[6] + b[6] * xs0, acc0[7] + a[7] * g0[7] + b[7] * xs0)
            if ROWS > 1:
                acc1 = (acc1[0] + a[0] * g1[0] + b[0] * xs1, acc1[1] + a[1] * g1[1] + b[1] * xs1,
                        acc1[2] + a[2] * g1[2] + b[2] * xs1, acc1[3] + a[3] * g1[3] + b[3] * xs1,
                        acc1[4] + a[4] * g1[4] + b[4] * xs1, acc1[5] + a[5] * g1[5] + b[5] * xs1,
                        acc1[6] + a[6] * g1[6] + b[6] * xs1, acc1[7] + a[7] * g1[7] + b[7] * xs1)
        else:
            a = ((s0 * 2048.0)[None, :], (s1 * 128.0)[None, :], (s2 * 2048.0)[None, :], (s3 * 2048.0)[None, :],
                 (s4 * 128.0)[None, :], (s5 * 2048.0)[None, :], (s6 * 128.0)[None, :], (s7 * 2048.0)[None, :])
            b = ((s0 * -z0)[None, :] - a[0], (s1 * -z1)[None, :] - a[1], (s2 * -z2)[None, :] - a[2],
                 (s3 * -z3)[None, :] - a[3], (s4 * -z4)[None, :] - a[4], (s5 * -z5)[None, :] - a[5],
                 (s6 * -z6)[None, :] - a[6], (s7 * -z7)[None, :] - a[7])
            for kk in tl.static_range(GROUP // BLOCK_K):
                offs_k = g * GROUP + kk * BLOCK_K + offs_kb
                w_off = offs_k[:, None].to(tl.int64) * stride_wk + w_cols
                if EVEN_W:
                    p = tl.load(w_ptr + w_off)
                else:
                    p = tl.load(w_ptr + w_off, mask=w_ok[None, :], other=0)
                # four shifts place all eight nibbles at bits 12..15 or 16..19; one mask-or each (``one`` is
                # 1.0's bits, a runtime value so that the and + or fuse into one LOP3) makes the float.
                lo = p << 12
                mid = p << 4
                hi = p >> 8
                top = p >> 16
                w0 = ((lo & 0xF000) | one).to(tl.float32, bitcast=True) * a[0] + b[0]
                w1 = ((lo & 0xF0000) | one).to(tl.float32, bitcast=True) * a[1] + b[1]
                w2 = ((mid & 0xF000) | one).to(tl.float32, bitcast=True) * a[2] + b[2]
                w3 = ((p & 0xF000) | one).to(tl.float32, bitcast=True) * a[3] + b[3]
                w4 = ((p & 0xF0000) | one).to(tl.float32, bitcast=True) * a[4] + b[4]
                w5 = ((hi & 0xF000) | one).to(tl.float32, bitcast=True) * a[5] + b[5]
                w6 = ((hi & 0xF0000) | one).to(tl.float32, bitcast=True) * a[6] + b[6]
                w7 = ((top & 0xF000) | one).to(tl.float32, bitcast=True) * a[7] + b[7]
                x0 = tl.load(x_ptr + offs_k).to(tl.float32)[:, None]
                acc0 = (acc0[0] + x0 * w0, acc0[1] + x0 * w1, acc0[2] + x0 * w2, acc0[3] + x0 * w3,
                        acc0[4] + x0 * w4, acc0[5] + x0 * w5, acc0[6] + x0 * w6, acc0[7] + x0 * w7)
                if ROWS > 1:
                    x1 = tl.load(x_ptr + stride_xm + offs_k).to(tl.float32)[:, None]
                    acc1 = (acc1[0] + x1 * w0, acc1[1] + x1 * w1, acc1[2] + x1 * w2, acc1[3] + x1 * w3,
                            acc1[4] + x1 * w4, acc1[5] + x1 * w5, acc1[6] + x1 * w6, acc1[7] + x1 * w7)
                if ROWS > 2:
                    x2 = tl.load(x_ptr + 2 * stride_xm + offs_k).to(tl.float32)[:, None]
                    acc2 = (acc2[0] + x2 * w0, acc2[1] + x2 * w1, acc2[2] + x2 * w2, acc2[3] + x2 * w3,
                            acc2[4] + x2 * w4, acc2[5] + x2 * w5, acc2[6] + x2 * w6, acc2[7] + x2 * w7)
                if ROWS > 3:
                    x3 = tl.load(x_ptr + 3 * stride_xm + offs_k).to(tl.float32)[:, None]
                    acc3 = (acc3[0] + x3 * w0, acc3[1] + x3 * w1, acc3[2] + x3 * w2, acc3[3] + x3 * w3,
                            acc3[4] + x3 * w4, acc3[5] + x3 * w5, acc3[6] + x3 * w6, acc3[7] + x3 * w7)

    # One reduction over K per program; plane j holds outputs 8w + INT4_ORDER[j].
    cols = offs_w * 8
    if SPLIT:
        dst = part_ptr + pid_k * M * N + cols
        row_stride = N
    else:
        dst = out_ptr + cols
        row_stride = stride_om
    for r in tl.static_range(ROWS):
        if r == 0:
            acc = acc0
        elif r == 1:
            acc = acc1
        elif r == 2:
            acc = acc2
        else:
            acc = acc3
        for j in tl.static_range(8):
            col = (j % 4) * 2 + j // 4          # plane j (nibble j) holds output 8w + col (canonical order)
            res = tl.sum(acc[j], axis=0)
            if not SPLIT:
                if HAS_BIAS:
                    res += tl.load(bias_ptr + cols + col, mask=w_ok, other=0.0).to(tl.float32)
                res = res.to(out_ptr.dtype.element_ty)
            tl.store(dst + r * row_stride + col, res, mask=w_ok)
    if SPLIT:
        # The last program to arrive for this output tile adds the partials in split order (deterministic).
        tl.debug_barrier()
        cnt = cnt_ptr + pid_w
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
            offs = pid_w * (BLOCK_W * 8) + tl.arange(0, BLOCK_W * 8)
            ok = offs < N
            for r in tl.static_range(ROWS):
                total = tl.zeros([BLOCK_W * 8], dtype=tl.float32)
                for sp in range(0, num_splits, 4):      # four loads in flight; fixed order
                    src = part_ptr + (sp * M + r) * N + offs
                    p0 = tl.load(src, mask=ok, other=0.0, cache_modifier=".cg")
                    p1 = tl.load(src + M * N, mask=ok & (sp + 1 < num_splits), other=0.0, cache_modifier=".cg")
                    p2 = tl.load(src + 2 * M * N, mask=ok & (sp + 2 < num_splits), other=0.0, cache_modifier=".cg")
                    p3 = tl.load(src + 3 * M * N, mask=ok & (sp + 3 < num_splits), other=0.0, cache_modifier=".cg")
                    total += (p0 + p1) + (p2 + p3)
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + r * stride_om + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


def _gemv_fp8_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                     M, N, K, k_per_split, num_splits, stride_xm, stride_wn, stride_om, stride_sg,
                     ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, SPLIT: tl.constexpr, BLOCK_SCALE: tl.constexpr,
                     SCALE_BK: tl.constexpr, SCALE_BN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.where(n_ok, offs_n, 0)            # clamp instead of masking: keeps the K loads vectorized
    offs_kb = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + offs_kb
        if EVEN_K:
            wt = tl.load(w_rows + offs_k[None, :]).to(tl.float32)
            x0 = tl.load(x_ptr + offs_k).to(tl.float32)[None, :]
        else:
            k_ok = offs_k < k_hi
            wt = tl.load(w_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
            x0 = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if BLOCK_SCALE:
            # 128x128-style blocks: a tile lies in one scale block, so its scale multiplies x (BLOCK_K values)
            sc = tl.load(s_ptr + (k0 // SCALE_BK) * stride_sg + (pid_n * BLOCK_N) // SCALE_BN)
            x0 = x0 * sc
        acc0 += wt * x0
        if ROWS > 1:
            if EVEN_K:
                x1 = tl.load(x_ptr + stride_xm + offs_k).to(tl.float32)[None, :]
            else:
                x1 = tl.load(x_ptr + stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if BLOCK_SCALE:
                x1 = x1 * sc
            acc1 += wt * x1
        if ROWS > 2:
            if EVEN_K:
                x2 = tl.load(x_ptr + 2 * stride_xm + offs_k).to(tl.float32)[None, :]
            else:
                x2 = tl.load(x_ptr + 2 * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if BLOCK_SCALE:
                x2 = x2 * sc
            acc2 += wt * x2
        if ROWS > 3:
            if EVEN_K:
                x3 = tl.load(x_ptr + 3 * stride_xm + offs_k).to(tl.float32)[None, :]
            else:
                x3 = tl.load(x_ptr + 3 * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if BLOCK_SCALE:
                x3 = x3 * sc
            acc3 += wt * x3
    if not BLOCK_SCALE:
        scale = tl.load(s_ptr + rows).to(tl.float32)
    if SPLIT:
        dst = part_ptr + pid_k * M * N + offs_n
        row_stride = N
    else:
        dst = out_ptr + offs_n
        row_stride = stride_om
    for r in tl.static_range(ROWS):
        if r == 0:
            acc = acc0
        elif r == 1:
            acc = acc1
        elif r == 2:
            acc = acc2
        else:
            acc = acc3
        res = tl.sum(acc, axis=1)
        if not BLOCK_SCALE:
            res = res * scale
        if not SPLIT:
            if HAS_BIAS:
                res += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            res = res.to(out_ptr.dtype.element_ty)
        tl.store(dst + r * row_stride, res, mask=n_ok)
    if SPLIT:
        # The last program to arrive for this output tile adds the partials in split order (deterministic).
        tl.debug_barrier()
        cnt = cnt_ptr + pid_n
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
            offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = offs < N
            for r in tl.static_range(ROWS):
                total = tl.zeros([BLOCK_N], dtype=tl.float32)
                for sp in range(0, num_splits, 4):      # four loads in flight; fixed order
                    src = part_ptr + (sp * M + r) * N + offs
                    p0 = tl.load(src, mask=ok, other=0.0, cache_modifier=".cg")
                    p1 = tl.load(src + M * N, mask=ok & (sp + 1 < num_splits), other=0.0, cache_modifier=".cg")
                    p2 = tl.load(src + 2 * M * N, mask=ok & (sp + 2 < num_splits), other=0.0, cache_modifier=".cg")
                    p3 = tl.load(src + 3 * M * N, mask=ok & (sp + 3 < num_splits), other=0.0, cache_modifier=".cg")
                    total += (p0 + p1) + (p2 + p3)
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + r * stride_om + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


_gemv_int4 = LazyKernel(_gemv_int4_kernel)
_gemv_fp8 = LazyKernel(_gemv_fp8_kernel)


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemvConfig:
    """One launch shape. ``block``: packed int32 words (8 outputs each) per int4 program, output features per
    FP8 program; ``block_k``: K rows per int4 tile (a divisor of the group), K per FP8 tile; 0 = default.
    ``splits = 0`` picks split-K to give ``target`` programs per SM."""

    block: int = 0
    block_k: int = 0
    splits: int = 0
    target: int = 4
    warps: int = 4
    defer: bool | None = None   # int4: scales once per group (None: for 1 row; more rows need the registers)
    gluon: bool = False         # int4 on sm_90: the cp.async-ring kernel (``gemv_gluon``); block_k = rows a step
    stages: int = 4             # gluon: ring depth
    wk: int = 1                 # gluon int4: rows of warps that split each step's K (more warps, same columns)
    tk: int = 0                 # gluon int4: > 0 picks the version-2 kernel with tk lanes along K (block_k = rows a
    vec: int = 4                # thread a step, vec = adjacent words a thread); 0: the first Gluon kernel
    ring: bool = True           # gluon int4 v2: a cp.async ring in shared memory (else register prefetch)
    maxnreg: int = 0            # gluon int4 v2: ptxas .maxnreg (0: its choice); fewer = more programs an SM


def _defaults(w: QuantWeight, rows: int) -> tuple[int, int]:
    if w.fmt == FMT_INT4:
        return 32, 16            # 32 words = one 128-byte line per packed row; 16 rows x 32 words = 128 threads x 16 B
    return (16 if rows == 1 else 8), 512


def supports(x: torch.Tensor, w: QuantWeight) -> bool:
    """Whether this kernel handles ``x @ w``: 1..4 rows; int4 without act-order and K a multiple of a group
    of 16k rows; FP8 [N, K] with per-channel scales or scale blocks (K side a multiple of 16, N side of 8)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] != w.k:
        return False
    if w.fmt == FMT_INT4:
        return (w.perm is None and w.g_idx is None and w.group % 16 == 0 and w.k % w.group == 0
                and w.n % 8 == 0 and w.weight.stride(1) == 1 and w.scales.stride(1) == 1
                and (w.zeros is None or w.zeros.stride() == w.scales.stride()))
    if w.fmt == FMT_FP8:      # per-channel, or blocks whose sides are multiples of 16 (8) like 128 x 128
        per_channel = _per_channel(w)
        blocks = w.scales.dim() == 2 and w.group % 16 == 0 and w.scale_bn % 8 == 0 and w.scales.stride(1) == 1
        return (per_channel or blocks) and w.weight.stride(1) == 1
    return False


def gluon_gemv_ok(x: torch.Tensor, w: QuantWeight, cfg: GemvConfig) -> bool:
    """Whether ``cfg``'s Gluon kernel runs here: an sm_90 GPU; int4 in whole column blocks and steps inside a
    group, or FP8 with per-channel scales in whole row blocks and 512-wide K steps."""
    if not (cfg.gluon and wgmma_supported(x.device) and supports(x, w)):
        return False
    if w.fmt == FMT_INT4:
        if cfg.block_k <= 0 or not _aligned16(x, w.weight, w.scales, w.zeros):
            return False
        if cfg.tk:
            return gemv_w4v2_supported(w.n, w.k, w.group, cfg.block_k, cfg.vec, cfg.tk, cfg.warps, cfg.wk)
        return gemv_w4_supported(w.n, w.k, w.group, cfg.block_k, cfg.warps, cfg.wk)
    return (_per_channel(w) and cfg.block > 0 and gemv_fp8_supported(w.n, w.k, cfg.block, cfg.warps)
            and _aligned16(w.weight) and cfg.block // cfg.warps * 16 * x.shape[0] <= 256)   # fp32 sums a thread


def _per_channel(w: QuantWeight) -> bool:
    return w.scale_bn == 1 and w.scales.dim() == 2 and w.scales.shape[0] == 1 and w.scales.numel() == w.n


def _pow2_divisor(limit: int, n: int) -> int:
    """The largest power of two <= ``limit`` that divides ``n`` (tile sizes inside scale blocks)."""
    b = 1
    while b * 2 <= limit and n % (b * 2) == 0:
        b *= 2
    return b


def _split_count(units: int, programs: int, cfg: GemvConfig, device: torch.device) -> int:
    """Splits of ``units`` K chunks so the grid holds about ``target`` programs per SM."""
    want = cfg.splits or cdiv(cfg.target * _num_sms(device), programs)
    per = cdiv(units, max(1, min(want, units)))
    return cdiv(units, per)


def quant_gemv(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               config: GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W) (+ bias) -> [M, N]`` for 1..4 rows (see ``supports``), in ``x``'s dtype."""
    if not supports(x, w):
        raise ValueError(f"quant_gemv does not support rows={x.shape[0]} with this weight (see supports())")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w.n
    dev = x.device
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=dev)
    _launch(x, w, bias, out, config or _config_for(x, w, bias))
    return out


_TUNED: dict[tuple, GemvConfig] = {}


def _candidates(w: QuantWeight) -> list[GemvConfig]:
    """A few launch shapes (the first is the untuned default): programs per SM and tile width."""
    if w.fmt == FMT_INT4:
        # Fewer warps per program = more K rows per thread per group, so the per-group scale work is spread
        # over more elements (4.6 -> 3.5 instructions per weight at one row, from the SASS), but fewer warps
        # per SM where split-K (by whole groups) runs out; 4 warps: ~168 registers, 3 programs an SM.
        return [GemvConfig(target=3), GemvConfig(block_k=8, warps=2, target=6),
                GemvConfig(block_k=4, warps=1, target=12), GemvConfig(block_k=4, warps=1, target=24),
                GemvConfig(target=2), GemvConfig(block=64, block_k=8, target=4)] + gluon_gemv_candidates(FMT_INT4)
    return [GemvConfig(), GemvConfig(target=2), GemvConfig(target=8), GemvConfig(block=32, block_k=256),
            GemvConfig(block=8, target=8)] + gluon_gemv_candidates(FMT_FP8)


def gluon_gemv_candidates(fmt: int) -> list[GemvConfig]:
    """Shapes of the Gluon GEMVs (sm_90). int4: rows a warp takes a step, warps, programs per SM (split-K, at
    most 16 splits), ring depth, rows of warps along K. FP8: output rows a program, warps, ring depth."""
    if fmt == FMT_FP8:
        return [GemvConfig(block=16, warps=4, stages=4, gluon=True), GemvConfig(block=8, warps=4, stages=4, gluon=True),
                GemvConfig(block=32, warps=4, stages=3, gluon=True), GemvConfig(block=8, warps=2, stages=6, gluon=True),
                GemvConfig(block=16, warps=8, stages=4, gluon=True)]
    def g(ks: int, warps: int, target: int, stages: int = 4, wk: int = 1) -> GemvConfig:
        return GemvConfig(block_k=ks, warps=warps, target=target, stages=stages, gluon=True, wk=wk)

    def v2(r: int, vec: int, tk: int, warps: int, target: int, stages: int = 8, wk: int = 1,
           ring: bool = True, regs: int = 0) -> GemvConfig:
        return GemvConfig(block_k=r, vec=vec, tk=tk, warps=warps, target=target, stages=stages, gluon=True, wk=wk,
                          ring=ring, maxnreg=regs)
    # Version 2 (a thread reads back what it copied; small steps, many programs an SM): r rows x vec words a
    # thread, tk lanes along K. Version 1: wk rows of warps share a column block (and a 128-row step).
    # Measured on an H200 (benchmarks/gpu/check_w4_gemv.py, weights cycled past the L2): version 1 is the
    # fastest at 1..4 rows; version 2's best shapes (narrow: 32 or 16 words a program) trail it by 5-15 %.
    return [g(32, 2, 4), g(32, 4, 4, wk=4), g(32, 1, 8, stages=6),
            v2(2, 1, 4, 4, 8, stages=3, ring=False), v2(4, 1, 8, 4, 8, stages=4, ring=False)]


#: The Gluon GEMV shape the engine runs on sm_90 per (format, rows); missing: the Triton GEMV's default. Filled
#: from ``benchmarks/gpu/bench_w4_wgmma.py --gemv`` on an H200 (FP8 at one row: 6.4 / 5.2 / 32.3 / 20.0 us against
#: the Triton GEMV's 8.5 / 7.1 / 35.8 / 22.8 on the 8B shape's qkv / o / gate_up / down).
_GLUON_DEFAULT: dict[tuple[int, int], GemvConfig] = {
    (FMT_FP8, 1): GemvConfig(block=8, warps=4, stages=4, gluon=True),
    # int4 (check_w4_gemv.py on an H200, us, weights cycled past the L2; M=1: qkv / o / gate_up 11.2 / 10.5 /
    # 29.1 against the Triton GEMV's 12.5 / 10.8 / 37.1; M=2: qkv 14.7 vs 19.8, o 13.2 vs 17.4, gate_up 39.2
    # vs 84.4; M=4: qkv 24.5 vs 36.2, gate_up 62.8 vs 94.0, o 23.1 vs 20.3)
    (FMT_INT4, 1): GemvConfig(block_k=32, warps=2, target=4, stages=4, gluon=True),
    (FMT_INT4, 2): GemvConfig(block_k=32, warps=2, target=4, stages=4, gluon=True),
    (FMT_INT4, 4): GemvConfig(block_k=32, warps=2, target=4, stages=4, gluon=True),
}

#: int4 with a long K (down_proj: 14336), where two warps a 32-word column block leave too few warps an SM:
#: four warp rows share each 128-row step (M=1: 20.2 us against the Triton GEMV's 22.0 and 25.0 for the shape
#: above); at 2 and 4 rows the Triton GEMV is as fast (28.9 / 57.1 vs 31.1 / 58.8 us), so it stays.
_LONG_K = 8192
_GLUON_DEFAULT_LONG_K: dict[tuple[int, int], GemvConfig] = {
    (FMT_INT4, 1): GemvConfig(block_k=32, warps=4, target=4, stages=4, gluon=True, wk=4),
}


def _gluon_default(fmt: int, rows: int, k: int) -> GemvConfig | None:
    """The Gluon shape the engine runs for (format, rows, K) on sm_90; None: the Triton GEMV's default."""
    table = _GLUON_DEFAULT_LONG_K if fmt == FMT_INT4 and k > _LONG_K else _GLUON_DEFAULT
    return table.get((fmt, rows))


def _config_for(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None) -> GemvConfig:
    """The tuned shape for this (format, rows, N, K), timing the candidates the first time a shape runs on
    CUDA outside graph capture with ``APHRODITE_QUANT_TUNE=1`` (default off: the default shape)."""
    key = (w.fmt, x.shape[0], w.n, w.k, x.dtype, w.zeros is not None, w.group, w.scale_bn)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    default = _candidates(w)[0]
    gluon = _gluon_default(w.fmt, x.shape[0], w.k)
    if gluon is not None and gluon_gemv_ok(x, w, gluon):
        default = gluon
    if x.device.type != "cuda" or not _tuning_enabled() or torch.cuda.is_current_stream_capturing():
        return default
    xs = torch.randn_like(x)
    scratch = torch.empty((x.shape[0], w.n), dtype=x.dtype, device=x.device)
    best, best_ms = default, float("inf")
    for cand in _candidates(w):
        if cand.gluon and not gluon_gemv_ok(x, w, cand):
            continue
        try:
            ms = _time(lambda c=cand: _launch(xs, w, bias, scratch, c))
        except Exception:   # a shape the compiler rejects is skipped
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    _TUNED[key] = best
    return best


def tuned_gemv_configs() -> dict[tuple, GemvConfig]:
    """What the tuner chose so far (printed by the GPU benchmark)."""
    return dict(_TUNED)


def _launch(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None, out: torch.Tensor, cfg: GemvConfig) -> None:
    m, k = x.shape
    n = w.n
    dev = x.device
    block, block_k = _defaults(w, m)
    block, block_k = cfg.block or block, cfg.block_k or block_k
    dummy = w.scales
    if w.fmt == FMT_FP8 and gluon_gemv_ok(x, w, cfg):
        gemv_fp8_launch(x, w.weight, w.scales.reshape(-1), bias, out, block_n=cfg.block, stages=cfg.stages,
                        warps=cfg.warps)
        return
    if w.fmt == FMT_INT4 and cfg.tk and gluon_gemv_ok(x, w, cfg):
        gemv_w4v2_launch(x, w.weight, w.scales, w.zeros, bias, out, n=n, group=w.group, r=cfg.block_k, v=cfg.vec,
                         tk=cfg.tk, wk=cfg.wk, stages=cfg.stages, warps=cfg.warps, target=cfg.target,
                         num_sms=_num_sms(dev), counters=_counters, splits=cfg.splits, ring=cfg.ring,
                         maxnreg=cfg.maxnreg)
        return
    if w.fmt == FMT_INT4 and gluon_gemv_ok(x, w, cfg):
        gemv_w4_launch(x, w.weight, w.scales, w.zeros, bias, out, n=n, group=w.group, ks=cfg.block_k,
                       stages=cfg.stages, warps=cfg.warps, target=cfg.target, num_sms=_num_sms(dev),
                       counters=_counters, wk=cfg.wk)
        return
    if w.fmt == FMT_INT4:
        block_k = min(block_k, w.group)
        if w.group % block_k:
            raise ValueError(f"block_k {block_k} must divide the group size {w.group}")
        nw = n // 8
        programs = cdiv(nw, block)
        num_groups = k // w.group
        splits = _split_count(num_groups, programs, cfg, dev)
        per = cdiv(num_groups, splits)
        part = torch.empty((splits, m, n), dtype=torch.float32, device=dev) if splits > 1 else out
        cnt = _counters(dev, programs) if splits > 1 else out
        _gemv_int4(dev)[(programs, splits)](
            x, w.weight, w.scales, w.zeros if w.zeros is not None else dummy,
            bias if bias is not None else dummy, out, part, cnt,
            m, n, nw, per, num_groups, splits, 0x3F800000,
            x.stride(0), w.weight.stride(0), w.scales.stride(0), out.stride(0),
            ROWS=m, GROUP=w.group, HAS_ZP=w.zeros is not None, HAS_BIAS=bias is not None,
            BLOCK_W=block, BLOCK_K=block_k, EVEN_W=nw % block == 0, SPLIT=splits > 1,
            DEFER=m == 1 if cfg.defer is None else cfg.defer and m <= 2, num_warps=cfg.warps)
        return
    block_scale = not _per_channel(w)
    if block_scale:          # tiles must not straddle scale blocks
        block_k = _pow2_divisor(min(block_k, w.group), w.group)
        block = _pow2_divisor(min(block, w.scale_bn), w.scale_bn)
    programs = cdiv(n, block)
    splits = _split_count(cdiv(k, block_k), programs, cfg, dev)
    k_per_split = cdiv(cdiv(k, block_k), splits) * block_k
    part = torch.empty((splits, m, n), dtype=torch.float32, device=dev) if splits > 1 else out
    cnt = _counters(dev, programs) if splits > 1 else out
    _gemv_fp8(dev)[(programs, splits)](
        x, w.weight, w.scales if block_scale else w.scales.reshape(-1), bias if bias is not None else dummy,
        out, part, cnt, m, n, k, k_per_split, splits, x.stride(0), w.weight.stride(0), out.stride(0),
        w.scales.stride(0), ROWS=m, HAS_BIAS=bias is not None, BLOCK_N=block, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, SPLIT=splits > 1, BLOCK_SCALE=block_scale, SCALE_BK=w.group,
        SCALE_BN=w.scale_bn, num_warps=cfg.warps)
