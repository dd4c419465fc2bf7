"""Fast GPU paths for GGUF K-quant weights (Q4_K, Q5_K, Q6_K: the bulk of Q4_K_M / Q5_K_M files).

The generic kernels of ``gguf_matmul`` dequantize a block into its natural ``[rows, 256]`` value order
with byte loads and index arithmetic per value; at batch 1 that is instruction-bound (~0.75 TB/s on an
H200). These kernels keep each block's codes in the order they are stored and bring the activations
to that order instead (a dot product does not care about the order of its terms):

- Q4_K: the 128 code bytes are 4 chunks ``c`` of 32 bytes ``l``; the low nibble of byte ``(c, l)``
  is value ``64c + l``, the high one value ``64c + 32 + l``. A tile ``[rows, blocks, 4, 32]`` of bytes
  is one 16-byte load per thread; the activations of the low and high nibbles are two contiguous
  loads. Sub-block ``2c + h`` has one 6-bit scale and min, applied after the 32-term sums. Q5_K is
  laid out the same, plus 32 bytes ``qh`` whose bit ``2c + h`` of byte ``l`` is the fifth bit.
- Q6_K: two halves ``n`` of 128 values; ``ql`` bytes ``(n, l)`` and ``(n, 32 + l)`` and the ``qh``
  byte ``(n, l)`` give values ``128n + 32t + l`` for ``t`` in 0..3; 16 values share an int8 scale.

Codes become floats by OR-ing them into the mantissa of 2^23 (exact, full rate, no int->float
conversion unit). The kernels share the per-block decoding:

- ``gemv_q8``: 1..16 activation rows in half precision: the activations are rounded to 8 bits per 32
  values (llama.cpp's q8_1, exact float sums kept for the min terms) and the codes meet them in
  ``dp4a`` integer dot products, 4 codes per instruction, one read of the weight for all rows. Q6_K
  blocks (210 bytes) start half-way into a word every other block; those words are assembled from
  two aligned loads. v2 (default, ``_gemv_q8k`` / ``_gemv_q8k6``): every load of a step has the same
  shape and 4 consecutive words per thread (even the block header and the activation scales, picked
  out afterwards by reductions), so the compiled loop has no shared-memory layout conversions or
  barriers and issues all of a step's loads at once; v1 (``_gemv_q8``, batch 1 only) converted
  layouts between dependent loads and streamed ~1.2 TB/s of blocks on an H200.
- ``gemv``: one activation row, exact (float32 activations, or ``Q8_ACTIVATIONS`` off). Each program
  owns ``BLOCK_N`` weight rows and walks the K blocks ``BLOCK_B`` at a time, reducing within each
  32/16-value group, so registers stay few.
- ``dot``: 2..16 float activation rows (or ``Q8_ACTIVATIONS`` off), one pass over the weight: the
  decoded (scaled) tile feeds ``tl.dot`` against the activations gathered in the same order;
  ``SPLIT_K`` programs share a row range when there are few rows (float32 atomics).
- ``dequantize``: the weight (or a band of its rows) to bf16/fp16 in natural order, for cuBLAS at
  larger batches (the band is scratch, reused per call; no whole-model copy).
"""
from __future__ import annotations

import functools
import os

import torch

from aphrodite.kernels.triton_utils import DeviceFunction, LazyKernel, next_pow2, tl, triton

Q4_K, Q5_K, Q6_K = 12, 13, 14
FAST_TYPES = (Q4_K, Q5_K, Q6_K)
_QK = 256
_BB = {Q4_K: 144, Q5_K: 176, Q6_K: 210}


def _codes_f32_fn(q, bias):
    """Small non-negative int32 codes -> float32 ``q - bias``, exactly: the codes OR-ed into the
    mantissa of 2^23 (0x4B000000), then 2^23 + bias subtracted."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


def _half_at_fn(p):
    lo = tl.load(p).to(tl.uint16)
    hi = tl.load(p + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


def _q4k_scales_fn(p, sub):
    """Q4_K blocks ``p`` and sub-block indices ``sub`` (broadcastable) -> ``(d * scale, dmin * min)``."""
    j = sub % 4
    hi = sub >= 4
    a = tl.load(p + 4 + j).to(tl.int32)      # scales[j]      (j = sub for sub < 4)
    b = tl.load(p + 8 + j).to(tl.int32)      # scales[j + 4]
    e = tl.load(p + 12 + j).to(tl.int32)     # scales[j + 8]
    sc = tl.where(hi, (e & 15) | ((a >> 6) << 4), a & 63).to(tl.float32)
    mn = tl.where(hi, (e >> 4) | ((b >> 6) << 4), b & 63).to(tl.float32)
    return _half_at(p) * sc, _half_at(p + 2) * mn


def _q4k_codes_fn(p, FIVE: tl.constexpr):
    """Q4_K (Q5_K if ``FIVE``) blocks ``p [..., 1, 1, 1]`` -> int32 codes ``(lo, hi)``, each
    ``[..., 4 c, 1, 32 l]``, and the offsets ``[4, 1, 32]`` in the block's 256 values of the low nibbles
    (the high ones are 32 further). Q5_K: bit ``2c + h`` of ``qh[l]`` is the fifth bit."""
    c = tl.arange(0, 4)[:, None, None]
    ln = tl.arange(0, 32)[None, None, :]
    if FIVE:
        q = tl.load(p + 48 + c * 32 + ln).to(tl.int32)
        qh = tl.load(p + 16 + ln).to(tl.int32)
        return (q & 15) | (((qh >> (2 * c)) & 1) << 4), (q >> 4) | (((qh >> (2 * c + 1)) & 1) << 4), c * 64 + ln
    else:
        q = tl.load(p + 16 + c * 32 + ln).to(tl.int32)
        return q & 15, q >> 4, c * 64 + ln


def _q6k_fields_fn(p):
    """Q6_K blocks ``p [..., 1, 1, 1]`` -> codes ``q_t - 32`` as float32, each ``[..., 2 n, 2 g, 16 i]``
    (value ``128n + 32t + 16g + i``), for t = 0..3."""
    n = tl.arange(0, 2)[:, None, None]
    li = tl.arange(0, 2)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    pa = p + n * 64 + li
    qa = tl.load(pa).to(tl.int32)
    qb = tl.load(pa + 32).to(tl.int32)
    qh = tl.load(p + 128 + n * 32 + li).to(tl.int32)
    q0 = _codes_f32((qa & 15) | ((qh & 3) << 4), 32.0)
    q1 = _codes_f32((qb & 15) | (((qh >> 2) & 3) << 4), 32.0)
    q2 = _codes_f32((qa >> 4) | (((qh >> 4) & 3) << 4), 32.0)
    q3 = _codes_f32((qb >> 4) | (((qh >> 6) & 3) << 4), 32.0)
    return q0, q1, q2, q3


def _q6k_offsets_fn():
    """Offsets ``[2 n, 2 g, 16 i]`` of value ``128n + 16g + i`` (t = 0; t adds 32t)."""
    return (tl.arange(0, 2)[:, None, None] * 128 + tl.arange(0, 2)[None, :, None] * 16
            + tl.arange(0, 16)[None, None, :])


def _q6k_scales_fn(p):
    """Q6_K blocks ``p [..., 1, 1]`` -> ``d * scale`` for t = 0..3, each ``[..., 2 n, 2 g]``."""
    ps = p + 192 + tl.arange(0, 2)[:, None] * 8 + tl.arange(0, 2)[None, :]
    d = _half_at(p + 208)
    s0 = tl.load(ps).to(tl.int8, bitcast=True).to(tl.float32) * d
    s1 = tl.load(ps + 2).to(tl.int8, bitcast=True).to(tl.float32) * d
    s2 = tl.load(ps + 4).to(tl.int8, bitcast=True).to(tl.float32) * d
    s3 = tl.load(ps + 6).to(tl.int8, bitcast=True).to(tl.float32) * d
    return s0, s1, s2, s3


_codes_f32 = DeviceFunction(_codes_f32_fn)
_half_at = DeviceFunction(_half_at_fn)
_q4k_scales = DeviceFunction(_q4k_scales_fn)
_q4k_codes = DeviceFunction(_q4k_codes_fn)
_q6k_fields = DeviceFunction(_q6k_fields_fn)
_q6k_scales = DeviceFunction(_q6k_scales_fn)
_q6k_offsets = DeviceFunction(_q6k_offsets_fn)



# ---------------------------------------------------------------------------------------------
# batch 1

def _gemv_fn(x_ptr, w_ptr, out_ptr, N, row_bytes, n_blocks,
             QTYPE: tl.constexpr, BB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rbase = w_ptr + tl.where(row_ok, rows, 0).to(tl.int64) * row_bytes
    bi = tl.arange(0, BLOCK_B)
    if QTYPE != 14:
        acc = tl.zeros((BLOCK_N, BLOCK_B, 4, 2), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_B, 2, 2), tl.float32)
    for b0 in range(0, n_blocks, BLOCK_B):
        blk = b0 + bi                                                   # [BB]
        p = rbase[:, None] + blk[None, :] * BB                          # [BN, BB]
        xb = x_ptr + blk[None, :, None, None, None] * 256               # [1, BB, 1, 1, 1]
        if QTYPE != 14:
            lo, hi, offs = _q4k_codes(p[:, :, None, None, None], QTYPE == 13)   # [BN, BB, 4, 1, 32]
            xl = tl.load(xb + offs).to(tl.float32)                      # [1, BB, 4, 1, 32]
            xh = tl.load(xb + offs + 32).to(tl.float32)
            s_lo = tl.sum(_codes_f32(lo, 0.0) * xl, axis=4)             # [BN, BB, 4, 1]
            s_hi = tl.sum(_codes_f32(hi, 0.0) * xh, axis=4)
            sx_lo = tl.sum(xl, axis=4)
            sx_hi = tl.sum(xh, axis=4)
            h = tl.arange(0, 2)[None, :]
            dsc, dmn = _q4k_scales(p[:, :, None, None], tl.arange(0, 4)[:, None] * 2 + h)   # [BN, BB, 4, 2]
            acc += dsc * tl.where(h == 0, s_lo, s_hi) - dmn * tl.where(h == 0, sx_lo, sx_hi)
        else:
            q0, q1, q2, q3 = _q6k_fields(p[:, :, None, None, None])     # [BN, BB, 2, 2, 16]
            xo = xb + _q6k_offsets()
            s0 = tl.sum(q0 * tl.load(xo).to(tl.float32), axis=4)       # [BN, BB, 2, 2]
            s1 = tl.sum(q1 * tl.load(xo + 32).to(tl.float32), axis=4)
            s2 = tl.sum(q2 * tl.load(xo + 64).to(tl.float32), axis=4)
            s3 = tl.sum(q3 * tl.load(xo + 96).to(tl.float32), axis=4)
            d0, d1, d2, d3 = _q6k_scales(p[:, :, None, None])          # [BN, BB, 2, 2]
            acc += d0 * s0 + d1 * s1 + d2 * s2 + d3 * s3
    res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    tl.store(out_ptr + rows, res.to(out_ptr.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# 2..16 rows: decoded tiles into tl.dot

def _dot_fn(x_ptr, w_ptr, out_ptr, M, N, row_bytes, n_blocks, blocks_per_split, stride_xm, stride_om,
            QTYPE: tl.constexpr, BB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            ATOMIC: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rbase = w_ptr + tl.where(row_ok, rows, 0).to(tl.int64) * row_bytes     # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    xm = x_ptr + tl.where(m_ok, offs_m, 0).to(tl.int64) * stride_xm        # [BM]
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for b in range(b_start, b_end):
        pb = rbase + b * BB
        p = pb[:, None, None, None]                                         # [BN, 1, 1, 1]
        xb = xm[:, None, None, None] + b * 256                              # [BM, 1, 1, 1]
        mk = m_ok[:, None, None, None]
        if QTYPE != 14:
            lo, hi, offs = _q4k_codes(p, QTYPE == 13)                       # [BN, 4, 1, 32]
            c2 = tl.arange(0, 4)[:, None, None] * 2
            s_lo, m_lo = _q4k_scales(p, c2)                                 # [BN, 4, 1, 1]
            s_hi, m_hi = _q4k_scales(p, c2 + 1)
            xl = tl.load(xb + offs, mask=mk, other=0.0)                     # [BM, 4, 1, 32]
            xh = tl.load(xb + offs + 32, mask=mk, other=0.0)
            dt = xl.dtype
            wl = (_codes_f32(lo, 0.0) * s_lo - m_lo).to(dt)
            wh = (_codes_f32(hi, 0.0) * s_hi - m_hi).to(dt)
            acc = tl.dot(tl.reshape(xl, (BLOCK_M, 128)), tl.trans(tl.reshape(wl, (BLOCK_N, 128))), acc,
                         input_precision=PRECISION)
            acc = tl.dot(tl.reshape(xh, (BLOCK_M, 128)), tl.trans(tl.reshape(wh, (BLOCK_N, 128))), acc,
                         input_precision=PRECISION)
        else:
            q0, q1, q2, q3 = _q6k_fields(p)                                 # [BN, 2, 2, 16]
            d0, d1, d2, d3 = _q6k_scales(pb[:, None, None])                 # [BN, 2, 2]
            xo = xb + _q6k_offsets()                                        # [BM, 2, 2, 16]
            x0 = tl.load(xo, mask=mk, other=0.0)
            x1 = tl.load(xo + 32, mask=mk, other=0.0)
            x2 = tl.load(xo + 64, mask=mk, other=0.0)
            x3 = tl.load(xo + 96, mask=mk, other=0.0)
            dt = x0.dtype
            w0 = tl.reshape((q0 * d0[:, :, :, None]).to(dt), (BLOCK_N, 64))
            w1 = tl.reshape((q1 * d1[:, :, :, None]).to(dt), (BLOCK_N, 64))
            w2 = tl.reshape((q2 * d2[:, :, :, None]).to(dt), (BLOCK_N, 64))
            w3 = tl.reshape((q3 * d3[:, :, :, None]).to(dt), (BLOCK_N, 64))
            acc = tl.dot(tl.reshape(x0, (BLOCK_M, 64)), tl.trans(w0), acc, input_precision=PRECISION)
            acc = tl.dot(tl.reshape(x1, (BLOCK_M, 64)), tl.trans(w1), acc, input_precision=PRECISION)
            acc = tl.dot(tl.reshape(x2, (BLOCK_M, 64)), tl.trans(w2), acc, input_precision=PRECISION)
            acc = tl.dot(tl.reshape(x3, (BLOCK_M, 64)), tl.trans(w3), acc, input_precision=PRECISION)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + rows[None, :]
    mask = m_ok[:, None] & row_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# dequantize (larger batches: then cuBLAS)

def _dequant_fn(w_ptr, out_ptr, N, row_bytes, stride_on,
                QTYPE: tl.constexpr, BB: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    pb = w_ptr + tl.where(row_ok, rows, 0).to(tl.int64) * row_bytes + b * BB
    p = pb[:, None, None, None]
    o = (out_ptr + rows.to(tl.int64) * stride_on + b * 256)[:, None, None, None]
    mk = row_ok[:, None, None, None]
    dt = out_ptr.dtype.element_ty
    if QTYPE != 14:
        lo, hi, offs = _q4k_codes(p, QTYPE == 13)                           # [BN, 4, 1, 32]
        c2 = tl.arange(0, 4)[:, None, None] * 2
        s_lo, m_lo = _q4k_scales(p, c2)
        s_hi, m_hi = _q4k_scales(p, c2 + 1)
        tl.store(o + offs, (_codes_f32(lo, 0.0) * s_lo - m_lo).to(dt), mask=mk)
        tl.store(o + offs + 32, (_codes_f32(hi, 0.0) * s_hi - m_hi).to(dt), mask=mk)
    else:
        q0, q1, q2, q3 = _q6k_fields(p)
        d0, d1, d2, d3 = _q6k_scales(pb[:, None, None])
        o = o + _q6k_offsets()
        tl.store(o, (q0 * d0[:, :, :, None]).to(dt), mask=mk)
        tl.store(o + 32, (q1 * d1[:, :, :, None]).to(dt), mask=mk)
        tl.store(o + 64, (q2 * d2[:, :, :, None]).to(dt), mask=mk)
        tl.store(o + 96, (q3 * d3[:, :, :, None]).to(dt), mask=mk)


# ---------------------------------------------------------------------------------------------
# batch 1 with 8-bit activations (llama.cpp's mmvq): integer dot products of 4 codes at a time

def _q6k_signed_bytes_fn(qa, qb, qh):
    """Q6_K's four 32-bit words of 6-bit codes q (0..63) as signed bytes q - 32, from the low-nibble words
    ``qa``/``qb`` and the high-bit word ``qh``: ((q | 0x80) - 0x20) ^ 0x80 per byte, so no byte borrows from
    its neighbour (-0x7F7F7F80 is 0x80808080 as an int32)."""
    q0 = (((qa & 0x0F0F0F0F) | ((qh & 0x03030303) << 4) | -0x7F7F7F80) - 0x20202020) ^ -0x7F7F7F80
    q1 = (((qb & 0x0F0F0F0F) | (((qh >> 2) & 0x03030303) << 4) | -0x7F7F7F80) - 0x20202020) ^ -0x7F7F7F80
    q2 = ((((qa >> 4) & 0x0F0F0F0F) | (((qh >> 4) & 0x03030303) << 4) | -0x7F7F7F80) - 0x20202020) ^ -0x7F7F7F80
    q3 = ((((qb >> 4) & 0x0F0F0F0F) | (((qh >> 6) & 0x03030303) << 4) | -0x7F7F7F80) - 0x20202020) ^ -0x7F7F7F80
    return q0, q1, q2, q3


_q6k_signed_bytes = DeviceFunction(_q6k_signed_bytes_fn)


def _dp4a_fn(a, b, c, ASM: tl.constexpr):
    """``c + sum_j a.byte[j] * b.byte[j]`` (signed bytes) per int32 element: one ``dp4a``."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        acc = c
        for j in tl.static_range(4):
            acc += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
        return acc


_dp4a = DeviceFunction(_dp4a_fn)


def _quant_x_fn(x_ptr, q_ptr, d_ptr, s_ptr, n_groups, stride_xm, GROUPS: tl.constexpr):
    """Activations -> int8 codes per 32 values with scale ``max|x| / 127`` (llama.cpp's q8_1), and
    each group's exact float sum (for the K-quants' min terms)."""
    m = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    ok = g < n_groups
    offs = g[:, None] * 32 + tl.arange(0, 32)[None, :]
    v = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    d = tl.max(tl.abs(v), axis=1) / 127.0
    inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
    q = tl.floor(v * inv[:, None] + 0.5).to(tl.int8)
    row = m.to(tl.int64) * n_groups
    tl.store(q_ptr + row * 32 + offs, q, mask=ok[:, None])
    tl.store(d_ptr + row + g, d, mask=ok)
    tl.store(s_ptr + row + g, tl.sum(v, axis=1), mask=ok)


def _word_at_fn(w32_ptr, i, odd):
    """The 4 bytes at byte ``4 * i + 2 * odd`` of a weight read as int32 words (Q6_K blocks are 210
    bytes, so every other block starts half-way into a word)."""
    lo = tl.load(w32_ptr + i)
    hi = tl.load(w32_ptr + i + odd)
    return tl.where(odd != 0, ((lo >> 16) & 0xFFFF) | (hi << 16), lo)


_word_at = DeviceFunction(_word_at_fn)


def _gemv_q8_fn(xq_ptr, xd_ptr, xs_ptr, w_ptr, w32_ptr, out_ptr, N, row_bytes, n_blocks,
                QTYPE: tl.constexpr, BB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                ASM: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    r = tl.where(row_ok, rows, 0).to(tl.int64)
    rbase = w_ptr + r * row_bytes                       # byte view (scales)
    rword = r * (row_bytes // 4)                        # word index of the row in the int32 view
    bi = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_N, BLOCK_B, 2 if QTYPE == 14 else 4, 2), tl.float32)
    for b0 in range(0, n_blocks, BLOCK_B):
        blk = b0 + bi                                   # [BB]
        p = rbase[:, None] + blk[None, :] * BB          # [BN, BB] block pointers (bytes)
        if QTYPE != 14:
            c = tl.arange(0, 4)[:, None, None]
            lw = tl.arange(0, 2)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]      # [1, 2, 4] word in chunk
            wrow = (rword[:, None] + blk[None, :] * (BB // 4))[:, :, None, None, None]
            if QTYPE == 13:   # Q5_K: qh words 4..11, codes from word 12; bit 2c + h of each qh byte
                qw = tl.load(w32_ptr + wrow + 12 + c * 8 + lw)                              # [BN, BB, 4, 2, 4]
                qhw = tl.load(w32_ptr + wrow + 4 + lw)                                      # [BN, BB, 1, 2, 4]
                wlo = (qw & 0x0F0F0F0F) | (((qhw >> (2 * c)) & 0x01010101) << 4)
                whi = ((qw >> 4) & 0x0F0F0F0F) | (((qhw >> (2 * c + 1)) & 0x01010101) << 4)
            else:
                qw = tl.load(w32_ptr + wrow + 4 + c * 8 + lw)                               # [BN, BB, 4, 2, 4]
                wlo = qw & 0x0F0F0F0F
                whi = (qw >> 4) & 0x0F0F0F0F
            xw = xq_ptr + blk[None, :, None, None, None] * 64 + c * 16 + lw
            ilo = tl.sum(_dp4a(wlo, tl.load(xw), 0, ASM), axis=4)                          # [BN, BB, 4, 2]
            ihi = tl.sum(_dp4a(whi, tl.load(xw + 8), 0, ASM), axis=4)
            c2 = tl.arange(0, 4)[:, None] * 2
            s_lo, m_lo = _q4k_scales(p[:, :, None, None], c2)                              # [BN, BB, 4, 1]
            s_hi, m_hi = _q4k_scales(p[:, :, None, None], c2 + 1)
            gx = blk[None, :, None, None] * 8 + c2                                         # [1, BB, 4, 1]
            acc += (s_lo * tl.load(xd_ptr + gx)) * ilo.to(tl.float32) \
                + (s_hi * tl.load(xd_ptr + gx + 1)) * ihi.to(tl.float32) \
                - 0.5 * (m_lo * tl.load(xs_ptr + gx) + m_hi * tl.load(xs_ptr + gx + 1))   # (counted twice)
        else:
            n = tl.arange(0, 2)[:, None, None]
            gw = tl.arange(0, 2)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]       # [1, 2, 4] word in 32
            ob = blk * BB                                                                   # block byte offset
            odd = (ob % 4 != 0).to(tl.int32)[None, :, None, None, None]
            wb = (rword[:, None] + ob[None, :] // 4)[:, :, None, None, None]
            qa = _word_at(w32_ptr, wb + n * 16 + gw, odd)                                   # [BN, BB, 2, 2, 4]
            qb = _word_at(w32_ptr, wb + n * 16 + 8 + gw, odd)
            qh = _word_at(w32_ptr, wb + 32 + n * 8 + gw, odd)
            xw = xq_ptr + blk[None, :, None, None, None] * 64 + n * 32 + gw
            q0, q1, q2, q3 = _q6k_signed_bytes(qa, qb, qh)
            i0 = tl.sum(_dp4a(q0, tl.load(xw), 0, ASM), axis=4).to(tl.float32)           # [BN, BB, 2, 2]
            i1 = tl.sum(_dp4a(q1, tl.load(xw + 8), 0, ASM), axis=4).to(tl.float32)
            i2 = tl.sum(_dp4a(q2, tl.load(xw + 16), 0, ASM), axis=4).to(tl.float32)
            i3 = tl.sum(_dp4a(q3, tl.load(xw + 24), 0, ASM), axis=4).to(tl.float32)
            d0, d1, d2, d3 = _q6k_scales(p[:, :, None, None])                              # [BN, BB, 2, 2]
            gx = blk[None, :, None, None] * 8 + tl.arange(0, 2)[:, None] * 4                # [1, BB, 2, 1]
            acc += d0 * tl.load(xd_ptr + gx) * i0 + d1 * tl.load(xd_ptr + gx + 1) * i1 \
                + d2 * tl.load(xd_ptr + gx + 2) * i2 + d3 * tl.load(xd_ptr + gx + 3) * i3
    res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    tl.store(out_ptr + rows, res.to(out_ptr.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# batch 1, 8-bit activations, v2: every tensor of a step has one shape, so no layout conversions
# (shared memory, barriers) sit between the loads and the math, and all of a step's loads are
# independent of each other (one round trip to memory per step)

def _half_lo_fn(w):
    """The half-precision number in the low 16 bits of int32 ``w``, as float32."""
    return (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


_half_lo = DeviceFunction(_half_lo_fn)


def _lane_fn(t, k, jl, AXIS: tl.constexpr):
    """Element ``k`` of each group of 4 along axis ``AXIS`` (the last) of int32 ``t`` (4 consecutive
    words one thread loaded at once), reduced out of that axis: a reduction, so the result lands in
    the layout of the step's other reductions (no shared-memory conversion)."""
    return tl.max(tl.where(jl == k, t, -2147483648), axis=AXIS)


_lane = DeviceFunction(_lane_fn)


def _gemv_q8k_fn(xq_ptr, xd_ptr, xs_ptr, w32_ptr, out_ptr, M, N, row_quads, n_blocks, stride_om,
                 QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                 ASM: tl.constexpr):
    """Q4_K / Q5_K, ``M <= BLOCK_M`` activation rows (8-bit, ``[M, K]``) against one read of the weight.
    Loads ``[m, rows, blocks, 4 c, 8 j]``, 4 consecutive words along ``j`` per thread: code word j of
    chunk c (bytes 4j..4j+3: low nibbles values 64c + 4j.., high nibbles 32 further), the activation
    words they meet, the block's 4 header words (d, dmin, 12 scale bytes) and the activation scales and
    sums of groups 4(c // 2)..+3. Reduced over ``j`` everything meets in one layout: no shared memory,
    no barriers, one round trip to memory per step."""
    BW: tl.constexpr = 36 if QTYPE == 12 else 44       # words per block
    CO: tl.constexpr = 4 if QTYPE == 12 else 12        # first code word
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    r = tl.where(row_ok, rows, 0).to(tl.int64)
    shape: tl.constexpr = (BLOCK_M, BLOCK_N, BLOCK_B, 4, 8)
    m = tl.minimum(tl.arange(0, BLOCK_M), M - 1)[:, None, None, None, None]
    xrow = m * (n_blocks * 64)                                           # words of 8-bit activations
    grow = m * (n_blocks * 8)                                            # groups of 32
    rw = (r * row_quads * 4)[None, :, None, None, None]                 # word offset of each row
    bi = tl.arange(0, BLOCK_B)[None, None, :, None, None]
    c = tl.arange(0, 4)[None, None, None, :, None]
    j = tl.arange(0, 8)[None, None, None, None, :]
    j4 = j % 4
    c4 = tl.arange(0, 4)[None, None, None, :]
    sh = (c4 % 2) * 16                                                 # byte 2c % 4 of a scale word
    low = c4 < 2
    gsel = (c % 2) * 2                                                 # group 2c within its 4
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_B, 4), tl.float32)
    for b0 in range(0, n_blocks, BLOCK_B):
        blk = b0 + bi
        wb = w32_ptr + rw + blk * BW                                   # [1, BN, BB, 1, 1] block start
        # the weight's pointers broadcast over the activation rows: every load of the step gets one layout
        qw = tl.load(tl.broadcast_to(wb + CO + c * 8 + j, shape))
        hdr = tl.load(tl.broadcast_to(wb + j4, shape))
        xb = tl.broadcast_to(xq_ptr + xrow + blk * 64 + c * 16 + j, shape)
        xl = tl.load(xb)
        xh = tl.load(xb + 8)
        gb = tl.broadcast_to(grow + blk * 8 + (c // 2) * 4 + j4, shape)
        xd = tl.load(xd_ptr + gb).to(tl.int32, bitcast=True)
        xs = tl.load(xs_ptr + gb).to(tl.int32, bitcast=True)
        if QTYPE == 13:
            qh = tl.load(tl.broadcast_to(wb + 4 + j, shape))
        lo = qw & 0x0F0F0F0F
        hi = (qw >> 4) & 0x0F0F0F0F
        if QTYPE == 13:
            lo = lo | (((qh >> (2 * c)) & 0x01010101) << 4)
            hi = hi | (((qh >> (2 * c + 1)) & 0x01010101) << 4)
        il = tl.sum(_dp4a(lo, xl, 0, ASM), axis=4).to(tl.float32)      # [BM, BN, BB, 4] sub-block 2c
        ih = tl.sum(_dp4a(hi, xh, 0, ASM), axis=4).to(tl.float32)      # sub-block 2c + 1
        w0 = _lane(hdr, 0, j4, 4)
        a1 = _lane(hdr, 1, j4, 4) >> sh
        a2 = _lane(hdr, 2, j4, 4) >> sh
        a3 = _lane(hdr, 3, j4, 4) >> sh
        xd0 = _lane(xd, gsel, j4, 4).to(tl.float32, bitcast=True)
        xd1 = _lane(xd, gsel + 1, j4, 4).to(tl.float32, bitcast=True)
        xs0 = _lane(xs, gsel, j4, 4).to(tl.float32, bitcast=True)
        xs1 = _lane(xs, gsel + 1, j4, 4).to(tl.float32, bitcast=True)
        sc0 = tl.where(low, a1 & 63, (a3 & 15) | ((a1 >> 2) & 48)).to(tl.float32)
        mn0 = tl.where(low, a2 & 63, ((a3 >> 4) & 15) | ((a2 >> 2) & 48)).to(tl.float32)
        sc1 = tl.where(low, (a1 >> 8) & 63, ((a3 >> 8) & 15) | ((a1 >> 10) & 48)).to(tl.float32)
        mn1 = tl.where(low, (a2 >> 8) & 63, ((a3 >> 12) & 15) | ((a2 >> 10) & 48)).to(tl.float32)
        acc += _half_lo(w0) * (il * (sc0 * xd0) + ih * (sc1 * xd1)) - _half_lo(w0 >> 16) * (mn0 * xs0 + mn1 * xs1)
    res = tl.sum(tl.sum(acc, axis=3), axis=2)                           # [BM, BN]
    om = tl.arange(0, BLOCK_M)[:, None]
    tl.store(out_ptr + om * stride_om + rows[None, :], res.to(out_ptr.dtype.element_ty),
             mask=(om < M) & row_ok[None, :])


def _funnel_fn(lo, hi, shift, ASM: tl.constexpr):
    """``(hi:lo) >> shift`` (shift 0 or 16), the low 32 bits: a word that starts half-way into ``lo``."""
    if ASM:
        return tl.inline_asm_elementwise("shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r", [lo, hi, shift],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.where(shift != 0, ((lo >> 16) & 0xFFFF) | (hi << 16), lo)


_funnel = DeviceFunction(_funnel_fn)


def _words_at_fn(p, e, jl, sh, ASM: tl.constexpr):
    """The 4 words at ``p + jl`` of a Q6_K block, ``e``: whether it is the odd one of its pair (starting
    2 bytes into a word: each word funnel-shifted with the next). The next words are the thread's own
    (moved down one lane by in-thread reductions, no loads) plus one load of word ``p + 4`` (odd blocks)."""
    lo = tl.load(p + jl)
    x = tl.load(p + 4 + jl * 0, mask=(jl == 3) & (e == 1), other=0)
    hi = tl.where(jl == 0, tl.expand_dims(_lane(lo, 1, jl, 6), 6),
                  tl.where(jl == 1, tl.expand_dims(_lane(lo, 2, jl, 6), 6),
                           tl.where(jl == 2, tl.expand_dims(_lane(lo, 3, jl, 6), 6), x)))
    return _funnel(lo, hi, sh, ASM)


_words_at = DeviceFunction(_words_at_fn)


def _gemv_q8k6_fn(xq_ptr, xd_ptr, xs_ptr, w32_ptr, out_ptr, M, N, row_words, n_blocks, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, ASM: tl.constexpr):
    """Q6_K by pairs of blocks (420 bytes: whole words; the odd block starts 2 bytes into word 52, its
    words are funnel-shifted from two loads), ``M <= BLOCK_M`` activation rows. Loads ``[m, rows,
    pairs, 2 e, 2 n, 2 jh, 4 jl]``, 4 consecutive words along ``jl`` per thread: element (e, n, j = 4jh
    + jl) of block 2p + e holds ql words 16n + j and 16n + 8 + j and qh word 32 + 8n + j (values 128n +
    32t + 4j.. for t = 0..3, scale bytes 8n + 2t + jh), the block's 4 scale words, the words around d
    and the 4 activation scales of groups 4n..4n+3. Reduced over ``jl`` everything meets in one layout."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    r = tl.where(row_ok, rows, 0).to(tl.int64)
    shape: tl.constexpr = (BLOCK_M, BLOCK_N, BLOCK_P, 2, 2, 2, 4)
    m = tl.minimum(tl.arange(0, BLOCK_M), M - 1)[:, None, None, None, None, None, None]
    xrow = m * (n_blocks * 64)
    grow = m * (n_blocks * 8)
    rw = (r * row_words)[None, :, None, None, None, None, None]
    pi = tl.arange(0, BLOCK_P)[None, None, :, None, None, None, None]
    e = tl.arange(0, 2)[None, None, None, :, None, None, None]
    n = tl.arange(0, 2)[None, None, None, None, :, None, None]
    jh = tl.arange(0, 2)[None, None, None, None, None, :, None]
    jl = tl.arange(0, 4)[None, None, None, None, None, None, :]
    sh = tl.broadcast_to(e * 16, shape)
    jh6 = tl.arange(0, 2)[None, None, None, None, None, :]
    sh6 = tl.arange(0, 2)[None, None, None, :, None, None] * 16
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_P, 2, 2, 2), tl.float32)
    for p0 in range(0, n_blocks // 2, BLOCK_P):
        pair = p0 + pi
        blk = pair * 2 + e
        pw = w32_ptr + rw + pair * 105 + e * 52                         # [1, BN, BP, 2, 1, 1, 1] block's first word
        # the weight's pointers broadcast over the activation rows: every load of the step gets one layout
        pa = tl.broadcast_to(pw + 16 * n + 4 * jh, shape)
        ph = tl.broadcast_to(pw + 32 + 8 * n + 4 * jh, shape)
        ps = tl.broadcast_to(pw + 48, shape)
        qa = _words_at(pa, e, jl, sh, ASM)
        qb = _words_at(pa + 8, e, jl, sh, ASM)
        qh = _words_at(ph, e, jl, sh, ASM)
        sw = _words_at(ps, e, jl, sh, ASM)                              # the 16 scale bytes
        # lane 3: word 52 (even), 104 (odd); the other lanes are not loaded
        dw = tl.load(tl.broadcast_to(pw + 49, shape) + jl, mask=tl.broadcast_to(jl == 3, shape), other=0)
        xb = tl.broadcast_to(xq_ptr + xrow + blk * 64 + 32 * n + 4 * jh + jl, shape)
        xd = tl.load(tl.broadcast_to(xd_ptr + grow + blk * 8 + 4 * n + jl, shape)).to(tl.int32, bitcast=True)
        q0, q1, q2, q3 = _q6k_signed_bytes(qa, qb, qh)
        i0 = tl.sum(_dp4a(q0, tl.load(xb), 0, ASM), axis=6).to(tl.float32)        # [BM, BN, BP, 2, 2, 2]
        i1 = tl.sum(_dp4a(q1, tl.load(xb + 8), 0, ASM), axis=6).to(tl.float32)
        i2 = tl.sum(_dp4a(q2, tl.load(xb + 16), 0, ASM), axis=6).to(tl.float32)
        i3 = tl.sum(_dp4a(q3, tl.load(xb + 24), 0, ASM), axis=6).to(tl.float32)
        s01 = _lane(sw, 2 * n, jl, 6)                                   # scale bytes 8n + 0..3
        s23 = _lane(sw, 2 * n + 1, jl, 6)                               # scale bytes 8n + 4..7
        bsh = jh6 * 8
        v = i0 * (((s01 << (24 - bsh)) >> 24).to(tl.float32) * _lane(xd, 0, jl, 6).to(tl.float32, bitcast=True)) \
            + i1 * (((s01 << (8 - bsh)) >> 24).to(tl.float32) * _lane(xd, 1, jl, 6).to(tl.float32, bitcast=True)) \
            + i2 * (((s23 << (24 - bsh)) >> 24).to(tl.float32) * _lane(xd, 2, jl, 6).to(tl.float32, bitcast=True)) \
            + i3 * (((s23 << (8 - bsh)) >> 24).to(tl.float32) * _lane(xd, 3, jl, 6).to(tl.float32, bitcast=True))
        acc += _half_lo(_lane(dw, 3, jl, 6) >> sh6) * v
    res = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=5), axis=4), axis=3), axis=2)   # [BM, BN]
    om = tl.arange(0, BLOCK_M)[:, None]
    tl.store(out_ptr + om * stride_om + rows[None, :], res.to(out_ptr.dtype.element_ty),
             mask=(om < M) & row_ok[None, :])


_gemv_kernel = LazyKernel(_gemv_fn)
_gemv_q8_kernel = LazyKernel(_gemv_q8_fn)
_gemv_q8k_kernel = LazyKernel(_gemv_q8k_fn)
_gemv_q8k6_kernel = LazyKernel(_gemv_q8k6_fn)
_quant_x_kernel = LazyKernel(_quant_x_fn)
_dot_kernel = LazyKernel(_dot_fn)
_dequant_kernel = LazyKernel(_dequant_fn)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _largest_divisor(n: int, cap: int) -> int:
    d = cap
    while n % d:
        d //= 2
    return d


# Launch parameters (an H200 at the Llama-3.1-8B shapes; the benchmark sweeps them).
# Batch-1 launch configurations, (rows per program, blocks per step, warps). Chosen from the compiled
# SASS for sm_90 (no GPU timing yet): the 8-bit path at (2, 8, 2) spends 5.6 (Q4_K) / 6.7 (Q6_K)
# instructions per weight byte with 48 registers and two 16-byte code loads per thread per step, and a
# 4096-row layer gives every SM of an H200 ~16 programs (~32 KB of loads in flight); layers of fewer
# than 2048 rows take one row per program to keep that many. GEMV_CONFIGS overrides per shape
# ("exact" / "q8", ggml type, N, K), e.g. from the sweep of benchmarks/gpu/bench_gguf_gpu.py.
GEMV_CONFIGS: dict[tuple[str, int, int, int], tuple[int, int, int]] = {}
GEMV_DEFAULT = {"exact": (2, 4, 2), "q8": (2, 8, 2), "q8v2": (4, 8, 4)}
GEMV_SMALL_N = {"exact": (2, 4, 2), "q8": (1, 8, 2), "q8v2": (2, 8, 2)}
# v2 with 2..16 activation rows, by rows rounded up to a power of 2: weight rows x blocks per step
# shrink as the rows grow, so that each thread holds ~64 weight bytes' worth of work (sm_90 code:
# 72-88 registers, no spills; ~0.13 warp instructions per weight byte per extra row).
Q8_ROWS_CONFIGS = {2: (4, 8, 4), 4: (4, 4, 4), 8: (2, 4, 4), 16: (2, 2, 4)}


def _gemv_config(kind: str, qtype: int, n: int, k: int) -> tuple[int, int, int]:
    default = GEMV_SMALL_N[kind] if n < 2048 else GEMV_DEFAULT[kind]
    if kind == "q8v2" and n >= 2048:
        # H200, lead call 2 (us per call; the table of bench_gguf_gpu.py --m1-table): Q6_K (2, 8, 2)
        # lm_head 280 vs 394 at (4, 8, 4), down 35.3 vs 46.2; Q4_K/Q5_K (4, 8, 4), 16 blocks a step for
        # wide layers (gate_up 28672x4096: 24.9 vs 29.5)
        default = (2, 8, 2) if qtype == Q6_K else (4, 16, 4) if n >= 16384 else (4, 8, 4)
    return GEMV_CONFIGS.get((kind, qtype, n, k), default)


# Batch 1 with half-precision activations rounds them to 8 bits per 32 values and uses integer dot
# products (llama.cpp's GPU kernels do the same); APHRODITE_GGUF_GPU_Q8_ACTIVATIONS=0 keeps them exact.
Q8_ACTIVATIONS = os.environ.get("APHRODITE_GGUF_GPU_Q8_ACTIVATIONS", "1").lower() in ("1", "true", "yes", "on")
# Up to this many activation rows (bf16/fp16) the 8-bit-activation kernels (v2) take them, one read of the
# weight for all rows. On the H200 (lead call 2, one 8B step of Q4_K_M matmuls) they took 3.2 ms at 1 row,
# 16.9 at 8 and 32.3 at 16 (~2 ms a row), ``dot`` ~14 ms at any 2..16 rows, dequantize + cuBLAS ~13 ms
# (13.3 at 64 rows): v2 up to 4 rows (~9 ms by that line), dequantize + cuBLAS from 5 (DOT_MAX_ROWS).
Q8_MAX_ROWS = 4
# Which 8-bit-activation GEMV: "v2" (``_gemv_q8k`` / ``_gemv_q8k6``: one layout for every load of a step,
# no shared memory or barriers, all loads of a step independent) or "v1" (``_gemv_q8``, whose compiled
# loop converts layouts through shared memory between dependent loads: ~1.2 TB/s of blocks on an H200).
GEMV_Q8_IMPL = os.environ.get("APHRODITE_GGUF_GPU_GEMV", "v2")
DOT_BLOCK_N = 32
DOT_WAVES = 4
DEQUANT_BLOCK_N = 16
# Up to this many float rows (or bf16/fp16 rows the 8-bit path does not take) the ``dot`` kernel reads the
# blocks once for all of them; beyond, LARGE_BATCH. On the H200 ``dot`` took ~14 ms for one 8B step at
# 8 or 16 rows (latency-bound: barriers between its loads and their use), dequantize + cuBLAS ~13 ms.
DOT_MAX_ROWS = 4
# Beyond: "dequant" (a band of the weight into bf16 scratch, then cuBLAS), "tiled" (``tiled_matmul``:
# decoded tiles into tl.dot), "generic" (the generic tiled GEMM of ``gguf_matmul``), or "auto" (up to
# GENERIC_MAX_ROWS generic, up to TILED_MAX_ROWS tiled, beyond dequant). The H200 (lead call 1, one 8B
# step of Q4_K_M matmuls): M=64 dequant 14.0 ms, generic 16.9, tiled 36.6; M=256 dequant 18.2, generic
# 42.7, tiled 45.4: dequant everywhere.
LARGE_BATCH = "dequant"
GENERIC_MAX_ROWS = 64
TILED_MAX_ROWS = 256
TILED_BLOCK_M = 128
TILED_BLOCK_N = 64
TILED_WARPS = 8
TILED_STAGES = 2
# Scratch band of the "dequant" path, in values (a band of rows at a time: never a whole-model copy).
# H200, lead call 2 (one 8B step): 32M values M=64 13.3 ms, M=256 17.0; 8M values (16 MB, meant to
# stay in L2) 23.0 and 30.3: four times the launches, and the small GEMMs cost more than the traffic saved.
SCRATCH_VALUES = 32 * 2**20
MIN_BAND = 256


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def gemv(x: torch.Tensor, qweight: torch.Tensor, qtype: int, out: torch.Tensor,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``out [1, N] = x [1, K] @ dequant(qweight)^T`` (``out`` may be a column slice of a wider row);
    ``config`` = (rows per program, blocks per step, warps) overrides the defaults (benchmarks)."""
    n = qweight.shape[0]
    n_blocks = x.shape[-1] // _QK
    block_n, block_b, warps = config or _gemv_config("exact", qtype, n, x.shape[-1])
    block_b = _largest_divisor(n_blocks, block_b)
    grid = (triton.cdiv(n, block_n),)
    kw = {"num_warps": warps} if x.is_cuda else {}
    _gemv_kernel(x.device)[grid](x, qweight, out, n, qweight.shape[1], n_blocks, QTYPE=qtype, BB=_BB[qtype],
                                 BLOCK_N=block_n, BLOCK_B=block_b, **kw)
    return out


def dot(x: torch.Tensor, qweight: torch.Tensor, qtype: int, out: torch.Tensor,
        split: int | None = None) -> torch.Tensor:
    """``out [M, N] = x [M, K] @ dequant(qweight)^T`` for M <= 16, one pass over the weight;
    ``split`` programs share each row range along K (default: enough to fill the GPU)."""
    m, k = x.shape
    n = qweight.shape[0]
    n_blocks = k // _QK
    grid_n = triton.cdiv(n, DOT_BLOCK_N)
    if split is None:
        split = 1
        if x.is_cuda:
            split = max(1, min(n_blocks, (DOT_WAVES * _sm_count(x.device.index or 0)) // grid_n))
    per_split = triton.cdiv(n_blocks, split)
    split = triton.cdiv(n_blocks, per_split)
    args = (qweight.shape[1], n_blocks, per_split, x.stride(0))
    consts = {"QTYPE": qtype, "BB": _BB[qtype], "BLOCK_M": 16, "BLOCK_N": DOT_BLOCK_N, "PRECISION": _precision(x)}
    if split > 1:
        acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        _dot_kernel(x.device)[(grid_n, split, 1)](x, qweight, acc, m, n, *args, acc.stride(0), ATOMIC=True, **consts)
        out.copy_(acc)
    else:
        _dot_kernel(x.device)[(grid_n, 1, 1)](x, qweight, out, m, n, *args, out.stride(0), ATOMIC=False, **consts)
    return out


def tiled_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: int, out: torch.Tensor | None,
                 config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``x @ dequant(qweight)^T`` for many rows: the ``dot`` kernel with row tiles of activations
    (each weight tile decoded once per ``BLOCK_M`` activation rows, nothing written); ``config`` =
    (BLOCK_M, BLOCK_N, warps, stages) overrides the defaults (benchmarks)."""
    m, k = x.shape
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    n_blocks = k // _QK
    bm, bn, warps, stages = config or (TILED_BLOCK_M, TILED_BLOCK_N, TILED_WARPS, TILED_STAGES)
    block_m = min(bm, max(16, next_pow2(m)))
    grid = (triton.cdiv(n, bn), 1, triton.cdiv(m, block_m))
    kw = {"num_warps": warps, "num_stages": stages} if x.is_cuda else {}
    _dot_kernel(x.device)[grid](x, qweight, out, m, n, qweight.shape[1], n_blocks, n_blocks, x.stride(0),
                                out.stride(0), QTYPE=qtype, BB=_BB[qtype], BLOCK_M=block_m, BLOCK_N=bn,
                                ATOMIC=False, PRECISION=_precision(x), **kw)
    return out


def dequantize(qweight: torch.Tensor, qtype: int, k: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, k]`` values of ``qweight`` in ``dtype`` (into ``out`` when given: a scratch band)."""
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n, DEQUANT_BLOCK_N), k // _QK)
    _dequant_kernel(qweight.device)[grid](qweight, out, n, qweight.shape[1], out.stride(0),
                                          QTYPE=qtype, BB=_BB[qtype], BLOCK_N=DEQUANT_BLOCK_N)
    return out


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: int, out: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequant(qweight)^T`` for many rows: bands of rows dequantized into scratch, then cuBLAS."""
    m, k = x.shape
    n = qweight.shape[0]
    band = max(MIN_BAND, min(n, SCRATCH_VALUES // k))
    if band >= n:
        w = dequantize(qweight, qtype, k, x.dtype)
        return torch.mm(x, w.t()) if out is None else torch.mm(x, w.t(), out=out)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    scratch = torch.empty(band, k, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, band):
        r1 = min(n, r0 + band)
        w = dequantize(qweight[r0:r1], qtype, k, x.dtype, out=scratch[:r1 - r0])
        torch.mm(x, w.t(), out=out[:, r0:r1])   # cuBLAS writes the column band in place (ldc = row stride)
    return out


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (int8 codes ``[M, K]``, scales ``[M, K/32]``, float sums ``[M, K/32]``)."""
    m, k = x.shape
    groups = k // 32
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    d = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    per = 32
    _quant_x_kernel(x.device)[(m, triton.cdiv(groups, per))](x, q, d, s, groups, x.stride(0), GROUPS=per)
    return q, d, s


def q8_supported(qtype: int, k: int) -> bool:
    """Whether the 8-bit-activation GEMV takes this weight (Q6_K needs rows of whole words)."""
    return qtype in (Q4_K, Q5_K) or (qtype == Q6_K and (k // _QK) % 2 == 0)


def _gemv_q8_v2(q: torch.Tensor, d: torch.Tensor, s: torch.Tensor, qweight: torch.Tensor, qtype: int,
                out: torch.Tensor, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``out [M, N]`` from the 8-bit activations ``(q, d, s)`` of ``M <= 16`` rows, one read of the weight."""
    m, k = q.shape
    n = qweight.shape[0]
    n_blocks = k // _QK
    if config is None:
        config = (_gemv_config("q8v2", qtype, n, k) if m == 1 else
                  GEMV_CONFIGS.get(("q8v2-rows", qtype, n, k), Q8_ROWS_CONFIGS[next_pow2(m)]))
    block_n, block_b, warps = config
    kw = {"num_warps": warps} if q.is_cuda else {}
    grid = (triton.cdiv(n, block_n),)
    args = (q.view(torch.int32), d, s, qweight.view(torch.int32), out, m, n)
    if qtype == Q6_K:
        _gemv_q8k6_kernel(q.device)[grid](*args, qweight.shape[1] // 4, n_blocks, out.stride(0),
                                          BLOCK_M=next_pow2(m), BLOCK_N=block_n,
                                          BLOCK_P=_largest_divisor(n_blocks // 2, max(1, block_b // 2)), ASM=q.is_cuda,
                                          **kw)
    else:
        _gemv_q8k_kernel(q.device)[grid](*args, qweight.shape[1] // 16, n_blocks, out.stride(0), QTYPE=qtype,
                                         BLOCK_M=next_pow2(m), BLOCK_N=block_n,
                                         BLOCK_B=_largest_divisor(n_blocks, block_b), ASM=q.is_cuda, **kw)
    return out


def gemv_q8(x: torch.Tensor, qweight: torch.Tensor, qtype: int, out: torch.Tensor,
            config: tuple[int, int, int] | None = None,
            xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``out [M, N] = x [M, K] @ dequant(qweight)^T`` for ``M <= Q8_MAX_ROWS`` with the activations
    rounded to 8 bits per 32 values (as llama.cpp's GPU kernels do: ~0.3% relative error per product)
    and integer dot products over the codes, one read of the weight (v1: batch 1 only)."""
    n = qweight.shape[0]
    k = x.shape[-1]
    n_blocks = k // _QK
    if xq is None:
        xq = quantize_activations(x.reshape(-1, k))
    q, d, s = xq
    if GEMV_Q8_IMPL == "v2" or q.shape[0] > 1:
        return _gemv_q8_v2(q, d, s, qweight, qtype, out, config)
    block_n, block_b, warps = config or _gemv_config("q8", qtype, n, k)
    block_b = _largest_divisor(n_blocks, block_b)
    kw = {"num_warps": warps} if x.is_cuda else {}
    _gemv_q8_kernel(x.device)[(triton.cdiv(n, block_n),)](
        q.view(torch.int32), d, s, qweight, qweight.view(torch.int32), out, n, qweight.shape[1], n_blocks,
        QTYPE=qtype, BB=_BB[qtype], BLOCK_N=block_n, BLOCK_B=block_b, ASM=x.is_cuda, **kw)
    return out
