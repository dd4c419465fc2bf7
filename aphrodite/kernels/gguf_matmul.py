"""Matrix products with GGUF (llama.cpp) quantized weights, dequantized inside the kernel.

A weight is ``uint8 [N, row_bytes]``: row n holds the blocks of output feature n, each block
``BLOCK_VALUES`` values in ``BLOCK_BYTES`` bytes (scales and codes, llama.cpp's layout). Two
Triton kernels read the blocks directly and never write a dequantized weight:

- ``_gemv_kernel`` for a few rows (decode): each program dequantizes a ``[BLOCK_N, QK]`` tile per
  block and reduces it against every input row in registers; ``SPLIT_K`` programs share a row
  range along K and add into a float32 result, so even a 4096-row layer fills the GPU at batch 1.
- ``_gemm_kernel`` for many rows (prefill): the same tiles, converted to the activation dtype,
  feed ``tl.dot``.

``dequantize_reference`` (plain PyTorch, any device) is the reference the kernels are tested
against (it is itself tested against the ``gguf`` package), and the path for embedding
lookups and for devices without Triton. ggml type codes are the ``GGMLQuantizationType``
values; this module does not import ``gguf`` (the GPU image has no such package).
"""
from __future__ import annotations

import functools

import torch

from aphrodite.kernels.triton_utils import HAS_TRITON, LazyKernel, tl, triton, use_triton
from aphrodite.kernels.triton_utils import DeviceFunction as _DeviceFunction

if HAS_TRITON:
    from aphrodite.kernels import gguf_gpu

# ggml type code -> (values per block, bytes per block)
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    2: (32, 18),     # Q4_0
    3: (32, 20),     # Q4_1
    6: (32, 22),     # Q5_0
    7: (32, 24),     # Q5_1
    8: (32, 34),     # Q8_0
    10: (256, 84),   # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
}
GGML_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
                   12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
# Unquantized ggml types and their torch dtypes.
GGML_FLOAT_TYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of ``k`` values of ``qtype``; ``ValueError`` if ``k`` is not whole blocks."""
    if qtype in GGML_FLOAT_TYPES:
        return k * GGML_FLOAT_TYPES[qtype].itemsize
    if qtype not in GGML_BLOCKS:
        raise ValueError(f"GGUF type {qtype} is not supported; supported: "
                         f"{', '.join(GGML_TYPE_NAMES.values())}, F32, F16, BF16")
    qk, bb = GGML_BLOCKS[qtype]
    if k % qk:
        raise ValueError(f"a row of {k} values is not a whole number of {GGML_TYPE_NAMES[qtype]} blocks of {qk}")
    return k // qk * bb


# ---------------------------------------------------------------------------------------------
# PyTorch reference

def _f16(b: torch.Tensor, o: int) -> torch.Tensor:
    return b[..., o:o + 2].contiguous().view(torch.float16).float()   # [..., 1]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs packed in a K-quant block's 12 bytes ``s [..., 12]``."""
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1).float(), torch.cat([lo_m, hi_m], -1).float()


def _dequant_blocks(b: torch.Tensor, qtype: int) -> torch.Tensor:
    """``b [..., BLOCK_BYTES]`` int32 bytes -> ``[..., BLOCK_VALUES]`` float32."""
    dev = b.device
    if qtype == 8:
        q = b[..., 2:34].to(torch.uint8).view(torch.int8).float()
        return _f16(b.to(torch.uint8), 0) * q
    if qtype in (2, 3, 6, 7):
        u8 = b.to(torch.uint8)
        d = _f16(u8, 0)
        qs_off = {2: 2, 3: 4, 6: 6, 7: 8}[qtype]
        q = _nibbles(b[..., qs_off:qs_off + 16])
        if qtype in (6, 7):
            qh_off = qs_off - 4
            qh = b[..., qh_off:qh_off + 4]
            bits = (qh[..., torch.arange(32, device=dev) // 8] >> (torch.arange(32, device=dev) % 8)) & 1
            q = q | (bits << 4)
        if qtype == 2:
            return d * (q.float() - 8)
        if qtype == 6:
            return d * (q.float() - 16)
        return d * q.float() + _f16(u8, 2)
    lead = b.shape[:-1]
    u8 = b.to(torch.uint8)
    if qtype == 10:   # Q2_K: [n 2, j 4, i 32]; scale g = n*8 + j*2 + i//16
        sc = b[..., 0:16].view(*lead, 2, 4, 2, 1)
        qs = b[..., 16:80].view(*lead, 2, 1, 2, 16)
        q = (qs >> (2 * torch.arange(4, device=dev)).view(4, 1, 1)) & 3
        val = _f16(u8, 80)[..., None, None, None] * (sc & 0xF) * q - _f16(u8, 82)[..., None, None, None] * (sc >> 4)
        return val.reshape(*lead, 256)
    if qtype == 11:   # Q3_K: hmask bit (n*4 + j) of hm[i] set -> no -4
        hm = b[..., 0:32].view(*lead, 1, 1, 32)
        qs = b[..., 32:96].view(*lead, 2, 1, 32)
        s = b[..., 96:108]
        g = torch.arange(16, device=dev)
        scale = (((s[..., g % 8] >> (4 * (g // 8))) & 0xF) | (((s[..., 8 + g % 4] >> (2 * (g // 4))) & 3) << 4)) - 32
        j = torch.arange(4, device=dev).view(4, 1)
        n = torch.arange(2, device=dev).view(2, 1, 1)
        q = ((qs >> (2 * j)) & 3) - 4 * (1 - ((hm >> (n * 4 + j)) & 1))
        scale = scale.view(*lead, 2, 4, 2, 1).expand(*lead, 2, 4, 2, 16).reshape(*lead, 2, 4, 32)
        return (_f16(u8, 108)[..., None, None] * scale * q).reshape(*lead, 256)
    if qtype in (12, 13):   # Q4_K / Q5_K: [c 4, h 2, l 32], sub-block 2c + h
        five = qtype == 13
        sc, mn = _scale_min_k4(b[..., 4:16])
        qs = b[..., 48:176] if five else b[..., 16:144]
        q = (qs.view(*lead, 4, 1, 32) >> (4 * torch.arange(2, device=dev)).view(2, 1)) & 0xF
        if five:
            sub = torch.arange(8, device=dev).view(4, 2, 1)
            q = q | (((b[..., 16:48].view(*lead, 1, 1, 32) >> sub) & 1) << 4)
        val = (_f16(u8, 0) * sc).view(*lead, 4, 2, 1) * q - (_f16(u8, 2) * mn).view(*lead, 4, 2, 1)
        return val.reshape(*lead, 256)
    if qtype == 14:   # Q6_K: [n 2, t 4, l 32]
        t = torch.arange(4, device=dev)   # (no host lists: this runs inside CUDA graph capture)
        ql = b[..., 0:128].view(*lead, 2, 2, 32).index_select(-2, t % 2)
        lo = (ql >> (4 * (t // 2)).view(4, 1)) & 0xF
        hi = (b[..., 128:192].view(*lead, 2, 1, 32) >> (2 * torch.arange(4, device=dev)).view(4, 1)) & 3
        q = (lo | (hi << 4)) - 32
        sc = b[..., 192:208].to(torch.uint8).view(torch.int8).float().view(*lead, 2, 4, 2, 1)
        sc = sc.expand(*lead, 2, 4, 2, 16).reshape(*lead, 2, 4, 32)
        return (_f16(u8, 208)[..., None, None] * sc * q).reshape(*lead, 256)
    raise ValueError(f"GGUF type {qtype} is not supported")


def dequantize_reference(qweight: torch.Tensor, qtype: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, k]`` values of the blocks ``qweight [N, row_bytes]`` (float types are reinterpreted)."""
    if qtype in GGML_FLOAT_TYPES:
        return qweight.contiguous().view(GGML_FLOAT_TYPES[qtype]).reshape(-1, k).to(dtype)
    qk, bb = GGML_BLOCKS[qtype]
    n = qweight.shape[0]
    blocks = qweight.reshape(n, k // qk, bb).to(torch.int32)
    return _dequant_blocks(blocks, qtype).reshape(n, k).to(dtype)


def dequantize(qweight: torch.Tensor, qtype: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize_reference``, or one Triton kernel for the K-quants of ``gguf_gpu`` where Triton runs
    (embedding lookups: two kernels per step instead of the reference's ~30 small ones)."""
    if HAS_TRITON and qtype in gguf_gpu.FAST_TYPES and k % 256 == 0 and use_triton(qweight):
        return gguf_gpu.dequantize(qweight, qtype, k, dtype)
    return dequantize_reference(qweight, qtype, k, dtype)


# ---------------------------------------------------------------------------------------------
# Triton

def _f16_at_fn(p):
    lo = tl.load(p).to(tl.uint16)
    hi = tl.load(p + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


def _dequant_tile_fn(blk, QTYPE: tl.constexpr, QK: tl.constexpr, BLOCK_N: tl.constexpr):
    """``blk [BLOCK_N]`` pointers to one block of each row -> ``[BLOCK_N, QK]`` float32 values."""
    if QTYPE == 8:   # Q8_0
        p = blk[:, None]
        q = tl.load(p + 2 + tl.arange(0, 32)[None, :]).to(tl.int8, bitcast=True).to(tl.float32)
        v = _f16_at(p) * q
    elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:   # Q4_0, Q4_1, Q5_0, Q5_1: [half 2, j 16]
        p = blk[:, None, None]
        h = tl.arange(0, 2)[None, :, None]
        j = tl.arange(0, 16)[None, None, :]
        if QTYPE == 2:
            qs_off = 2
        elif QTYPE == 3:
            qs_off = 4
        elif QTYPE == 6:
            qs_off = 6
        else:
            qs_off = 8
        q = ((tl.load(p + qs_off + j).to(tl.int32) >> (4 * h)) & 0xF)
        if QTYPE == 6 or QTYPE == 7:
            e = h * 16 + j
            q = q | (((tl.load(p + (qs_off - 4) + e // 8).to(tl.int32) >> (e % 8)) & 1) << 4)
        d = _f16_at(p)
        if QTYPE == 2:
            v = d * (q.to(tl.float32) - 8.0)
        elif QTYPE == 6:
            v = d * (q.to(tl.float32) - 16.0)
        else:
            v = d * q.to(tl.float32) + _f16_at(p + 2)
    elif QTYPE == 10 or QTYPE == 11:   # Q2_K, Q3_K: [n 2, j 4, i 32]
        p = blk[:, None, None, None]
        n = tl.arange(0, 2)[None, :, None, None]
        j = tl.arange(0, 4)[None, None, :, None]
        i = tl.arange(0, 32)[None, None, None, :]
        g = n * 8 + j * 2 + i // 16
        if QTYPE == 10:
            q = (tl.load(p + 16 + n * 32 + i).to(tl.int32) >> (2 * j)) & 3
            sc = tl.load(p + g).to(tl.int32)
            v = _f16_at(p + 80) * (sc & 0xF).to(tl.float32) * q.to(tl.float32) \
                - _f16_at(p + 82) * (sc >> 4).to(tl.float32)
        else:  # Q3_K
            q = (tl.load(p + 32 + n * 32 + i).to(tl.int32) >> (2 * j)) & 3
            hb = (tl.load(p + i).to(tl.int32) >> (n * 4 + j)) & 1
            q = q - 4 * (1 - hb)
            lo = (tl.load(p + 96 + g % 8).to(tl.int32) >> (4 * (g // 8))) & 0xF
            hi = (tl.load(p + 104 + g % 4).to(tl.int32) >> (2 * (g // 4))) & 3
            v = _f16_at(p + 108) * ((lo | (hi << 4)) - 32).to(tl.float32) * q.to(tl.float32)
    elif QTYPE == 12 or QTYPE == 13:   # Q4_K, Q5_K: [c 4, h 2, l 32], sub-block 2c + h
        p = blk[:, None, None, None]
        c = tl.arange(0, 4)[None, :, None, None]
        h = tl.arange(0, 2)[None, None, :, None]
        ln = tl.arange(0, 32)[None, None, None, :]
        sub = c * 2 + h   # [1, 4, 2, 1]
        a = tl.load(p + 4 + sub).to(tl.int32)
        b = tl.load(p + 8 + sub).to(tl.int32)
        cc = tl.load(p + 4 + tl.where(sub >= 4, sub - 4, sub)).to(tl.int32)
        sc = tl.where(sub < 4, a & 63, (b & 0xF) | ((cc >> 6) << 4)).to(tl.float32)
        mn = tl.where(sub < 4, b & 63, (b >> 4) | ((a >> 6) << 4)).to(tl.float32)
        if QTYPE == 12:
            q = (tl.load(p + 16 + c * 32 + ln).to(tl.int32) >> (4 * h)) & 0xF
        else:
            q = (tl.load(p + 48 + c * 32 + ln).to(tl.int32) >> (4 * h)) & 0xF
            q = q | (((tl.load(p + 16 + ln).to(tl.int32) >> sub) & 1) << 4)
        v = (_f16_at(p) * sc) * q.to(tl.float32) - _f16_at(p + 2) * mn
    else:   # Q6_K: [n 2, t 4, l 32]
        p = blk[:, None, None, None]
        n = tl.arange(0, 2)[None, :, None, None]
        t = tl.arange(0, 4)[None, None, :, None]
        ln = tl.arange(0, 32)[None, None, None, :]
        lo = (tl.load(p + n * 64 + (t % 2) * 32 + ln).to(tl.int32) >> (4 * (t // 2))) & 0xF
        hi = (tl.load(p + 128 + n * 32 + ln).to(tl.int32) >> (2 * t)) & 3
        sc = tl.load(p + 192 + n * 8 + 2 * t + ln // 16).to(tl.int8, bitcast=True).to(tl.float32)
        v = _f16_at(p + 208) * sc * ((lo | (hi << 4)) - 32).to(tl.float32)
    return tl.reshape(v, (BLOCK_N, QK))


_f16_at = _DeviceFunction(_f16_at_fn) if HAS_TRITON else _f16_at_fn
_dequant_tile = _DeviceFunction(_dequant_tile_fn) if HAS_TRITON else _dequant_tile_fn


def _gemv_kernel_fn(x_ptr, w_ptr, out_ptr, M, N, row_bytes, stride_xm, stride_om, n_blocks, blocks_per_split,
                 QTYPE: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_base = w_ptr + tl.where(row_ok, rows, 0).to(tl.int64) * row_bytes
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, QK)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    if BLOCK_M == 1:   # batch 1: elementwise products, one reduction at the end
        acc1 = tl.zeros((BLOCK_N, QK), dtype=tl.float32)
        for b in range(b_start, b_end):
            w = _dequant_tile(row_base + b * BB, QTYPE, QK, BLOCK_N)
            x = tl.load(x_ptr + b * QK + offs_k).to(tl.float32)
            acc1 += w * x[None, :]
        acc = tl.reshape(tl.sum(acc1, axis=1), (1, BLOCK_N))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b in range(b_start, b_end):
            w = _dequant_tile(row_base + b * BB, QTYPE, QK, BLOCK_N)   # [BLOCK_N, QK]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + b * QK + offs_k[None, :], mask=m_ok[:, None],
                        other=0.0).to(tl.float32)   # [BLOCK_M, QK]
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    ptrs = out_ptr + offs_m[:, None] * stride_om + rows[None, :]
    mask = m_ok[:, None] & row_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_kernel_fn(x_ptr, w_ptr, out_ptr, M, N, row_bytes, stride_xm, stride_om, n_blocks,
                 QTYPE: tl.constexpr, QK: tl.constexpr, BB: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_base = w_ptr + tl.where(row_ok, rows, 0).to(tl.int64) * row_bytes
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, QK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, n_blocks):
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + b * QK + offs_k[None, :],
                    mask=m_ok[:, None], other=0.0)
        w = _dequant_tile(row_base + b * BB, QTYPE, QK, BLOCK_N).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + rows[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


_gemv_kernel = LazyKernel(_gemv_kernel_fn)
_gemm_kernel = LazyKernel(_gemm_kernel_fn)

# Up to this many rows the GEMV kernel runs (one tile of rows, reduction in registers).
GEMV_MAX_ROWS = 8


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def random_blocks(qtype: int, rows: int, k: int, scale: float = 1e-3, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Valid random blocks ``uint8 [rows, row_bytes]``: random codes, half-precision scales in
    ``[0, scale)`` (dummy weights for benchmarks; the tests draw theirs with numpy)."""
    qk, bb = GGML_BLOCKS[qtype]
    raw = torch.randint(0, 256, (rows, k // qk, bb), dtype=torch.uint8, device=device, generator=generator)
    for off in _HALF_FIELDS[qtype]:
        halves = (torch.rand(rows, k // qk, device=device, generator=generator) * scale).to(torch.float16)
        raw[:, :, off:off + 2] = halves.view(torch.uint8).view(rows, k // qk, 2)
    return raw.view(rows, -1)


# Byte offsets of the half-precision scales (d, and the min where a type has one) in each block.
_HALF_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 10: (80, 82), 11: (108,), 12: (0, 2),
                13: (0, 2), 14: (208,)}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def q8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The 8-bit activations the K-quant GEMVs would compute for ``x [M, K]`` (shared by the segments
    of a fused layer), or None where that path does not apply."""
    if not _q8_rows(x):
        return None
    return gguf_gpu.quantize_activations(x.reshape(-1, x.shape[-1]))


def _q8_rows(x: torch.Tensor) -> bool:
    """Whether the 8-bit-activation K-quant GEMVs take ``x [M, K]`` (few rows of bf16/fp16)."""
    m = x.reshape(-1, x.shape[-1]).shape[0]
    return (HAS_TRITON and gguf_gpu.Q8_ACTIVATIONS and x.shape[-1] % 256 == 0
            and x.dtype in (torch.bfloat16, torch.float16) and use_triton(x)
            and (m == 1 or (1 < m <= gguf_gpu.Q8_MAX_ROWS and gguf_gpu.GEMV_Q8_IMPL == "v2")))


def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, qtype: int, out: torch.Tensor | None = None,
                xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(qweight)^T`` with the Triton kernels; ``out`` may be a column slice of a
    wider ``[M, *]`` tensor (fused layers whose projections use different block types); ``xq``: the
    ``q8_activations`` of ``x`` when the caller already has them.

    Q4_K, Q5_K and Q6_K (the bulk of Q4_K_M / Q5_K_M files) take the kernels of ``gguf_gpu``: up to 16
    bf16/fp16 rows the 8-bit-activation GEMV (one read of the weight for all rows; float32 rows or
    ``Q8_ACTIVATIONS`` off: the exact GEMV at batch 1, a single pass into ``tl.dot`` up to 16 rows),
    beyond, bands of the weight dequantized into scratch + cuBLAS; the other types the generic kernels
    below."""
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    qk, bb = GGML_BLOCKS[qtype]
    n_blocks = k // qk
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if qtype in gguf_gpu.FAST_TYPES:
        if _q8_rows(x) and gguf_gpu.q8_supported(qtype, k):
            return gguf_gpu.gemv_q8(x, qweight, qtype, out, xq=xq)
        if m == 1:
            return gguf_gpu.gemv(x, qweight, qtype, out)
        if m <= gguf_gpu.DOT_MAX_ROWS:
            return gguf_gpu.dot(x, qweight, qtype, out)
        path = gguf_gpu.LARGE_BATCH
        if path == "auto":
            path = ("generic" if m <= gguf_gpu.GENERIC_MAX_ROWS else
                    "tiled" if m <= gguf_gpu.TILED_MAX_ROWS else "dequant")
        if path == "dequant":
            return gguf_gpu.dequant_matmul(x, qweight, qtype, out)
        if path == "tiled":
            return gguf_gpu.tiled_matmul(x, qweight, qtype, out)
    if m <= GEMV_MAX_ROWS:
        block_n = 16 if qk == 256 else 32
        block_m = _pow2(m)
        grid_n = triton.cdiv(n, block_n)
        # Enough programs to cover the GPU at batch 1: split K when there are few row tiles.
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 1
        split = max(1, min(n_blocks, (4 * sms) // grid_n)) if x.is_cuda else 1
        per_split = triton.cdiv(n_blocks, split)
        split = triton.cdiv(n_blocks, per_split)
        if split > 1:
            acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
            _gemv_kernel(x.device)[(grid_n, split)](x, qweight, acc, m, n, qweight.shape[1], x.stride(0), acc.stride(0),
                                          n_blocks, per_split, QTYPE=qtype, QK=qk, BB=bb, BLOCK_M=block_m,
                                          BLOCK_N=block_n, ATOMIC=True)
            out.copy_(acc)
        else:
            _gemv_kernel(x.device)[(grid_n, 1)](x, qweight, out, m, n, qweight.shape[1], x.stride(0), out.stride(0),
                                      n_blocks, per_split, QTYPE=qtype, QK=qk, BB=bb, BLOCK_M=block_m,
                                      BLOCK_N=block_n, ATOMIC=False)
        return out
    block_m = 64 if m >= 64 else max(16, _pow2(m))
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gemm_kernel(x.device)[grid](x, qweight, out, m, n, qweight.shape[1], x.stride(0), out.stride(0), n_blocks,
                       QTYPE=qtype, QK=qk, BB=bb, BLOCK_M=block_m, BLOCK_N=block_n)
    return out
