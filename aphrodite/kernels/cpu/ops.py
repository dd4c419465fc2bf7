"""PyTorch-facing wrappers of the C kernels in ``cpu_ops.c``; references live in the tests.

Each wrapper takes contiguous CPU tensors of float32 or bfloat16 and returns a new tensor.
Callers ask ``available(dtype)`` first and keep their PyTorch code as the fallback, so a
machine without a C compiler still runs (more slowly) on the same model code.
"""
from __future__ import annotations

import ctypes

import torch

from aphrodite.kernels.cpu.build import load_library

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

# Up to this many input rows a linear layer streams its weight once through the C GEMV;
# beyond it the batch is compute-bound and a blocked GEMM wins. Measured on the CI machine
# against per-call-packed BLAS (F.linear) and against oneDNN with the weight packed at load.
GEMV_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 8}
GEMV_MAX_ROWS_VS_PACKED = {torch.float32: 3, torch.bfloat16: 4}


def available(dtype: torch.dtype) -> bool:
    """Whether the C kernels handle ``dtype`` on this machine."""
    return dtype in _DTYPE_CODES and load_library() is not None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype).contiguous()`` without the dispatcher round trip when ``t`` already is (about 2 us
    saved per call: decode calls these wrappers several times per layer)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _lib() -> ctypes.CDLL:
    lib = load_library()
    assert lib is not None, "CPU kernels are not available (check available() first)"
    return lib


def use_gemv(x: torch.Tensor, weight: torch.Tensor, packed: bool = False) -> bool:
    """Whether ``linear(x, weight)`` should take the C GEMV: few rows, row-major weight.
    ``packed``: the alternative is oneDNN with a pre-packed weight, not ``F.linear``."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    limit = (GEMV_MAX_ROWS_VS_PACKED if packed else GEMV_MAX_ROWS).get(x.dtype, 0)
    return (0 < rows <= limit and weight.numel() > 0 and x.device.type == "cpu" and weight.dtype == x.dtype
            and weight.is_contiguous() and available(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a row-major ``weight [N, K]``, float32 accumulation."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    n = weight.shape[0]
    out = torch.empty(x2.shape[0], n, dtype=x.dtype)
    bias = None if bias is None else bias.contiguous()   # kept alive in a local: C reads its memory
    _lib().aph_linear(_DTYPE_CODES[x.dtype], _ptr(weight), _ptr(x2), _ptr(bias), _ptr(out),
                      x2.shape[0], n, k)
    return out.view(*x.shape[:-1], n)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int = 0, soft_cap: float = 0.0) -> torch.Tensor:
    """One query token per sequence, ``q [B, Hq, D]``, over the cache ``[blocks, block_size, Hkv, D]``.
    ``sliding_window > 0``: only the last that many keys; ``soft_cap > 0``: scores ``cap * tanh(s / cap)``."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == q.dtype
    q = q.contiguous()
    tables = _as(block_tables, torch.int32)
    lens = _as(seq_lens, torch.int32)
    out = torch.empty_like(q)
    _lib().aph_paged_decode_attention(
        _DTYPE_CODES[q.dtype], _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(tables), _ptr(lens),
        _ptr(out), b, hq, hkv, d, block_size, tables.shape[1], ctypes.c_float(scale), int(sliding_window or 0),
        ctypes.c_float(soft_cap or 0.0))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x``; with ``residual``, of ``x + residual``, returning ``(normed, x + residual)``."""
    n = x.shape[-1]
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    weight = _as(weight, x.dtype)
    out = torch.empty_like(x)
    res_out = None if residual is None else torch.empty_like(x)
    _lib().aph_rms_norm(_DTYPE_CODES[x.dtype], _ptr(x), _ptr(residual), _ptr(res_out), _ptr(weight),
                        _ptr(out), x.numel() // n, n, ctypes.c_float(eps))
    return out if residual is None else (out, res_out)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` in one pass."""
    d = x.shape[-1] // 2
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype)
    _lib().aph_silu_and_mul(_DTYPE_CODES[x.dtype], _ptr(x), _ptr(out), x.numel() // (2 * d), d)
    return out


def sample_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor,
                       temperature: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of ``softmax(logits / temperature)`` at the row's uniform (inverse CDF).

    ``temperature`` (rows <= 0 count as 1) folds the division in; without it ``logits`` are
    taken as already scaled. Same rule as ``sampler.sample_from_logits``, without [N, V] temporaries.
    """
    logits = logits.float().contiguous()
    u = _as(uniforms, torch.float64)
    temp = None if temperature is None else temperature.float().contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _lib().aph_sample_inverse_cdf(_ptr(logits), _ptr(temp), _ptr(u), _ptr(out), logits.shape[0], logits.shape[1])
    return out


def row_stats(logits: torch.Tensor) -> torch.Tensor:
    """[N, 4] per row of float32 logits: max, softmax entropy, finite count, std of the finite logits
    (``kernels.sampling.row_stats_ref``), in two reads of each row."""
    x = logits.float().contiguous()
    out = torch.empty(x.shape[0], 4, dtype=torch.float32)
    _lib().aph_row_stats(_ptr(x), _ptr(out), x.shape[0], x.shape[1])
    return out


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1, sorted=False)`` for [N, V] float32 rows by radix select (no sort);
    among values tied at the k-th, the lowest indices are taken."""
    x = x.float().contiguous()
    vals = torch.empty(x.shape[0], k, dtype=torch.float32)
    idx = torch.empty(x.shape[0], k, dtype=torch.int64)
    _lib().aph_topk(_ptr(x), _ptr(vals), _ptr(idx), x.shape[0], x.shape[1], k)
    return vals, idx


def apply_bitmask_(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """In place: -inf in contiguous float32 ``logits [N, V]`` where the int32 ``mask [N, ceil(V/32)]`` has a 0 bit."""
    m = mask.to(torch.int32).contiguous()
    _lib().aph_apply_bitmask(_ptr(logits), _ptr(m), logits.shape[0], logits.shape[1], m.shape[1])


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Copy ``k``/``v`` rows ``[T, Hkv, D]`` into the cache at ``slot_mapping`` (-1 = not written)."""
    k, v = _rows(k), _rows(v)
    slots = _as(slot_mapping, torch.int64)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == k.dtype
    _lib().aph_write_kv(_DTYPE_CODES[k.dtype], _ptr(k), _ptr(v), _ptr(k_cache), _ptr(v_cache), _ptr(slots),
                        k.shape[0], k.shape[1] * k.shape[2], ctypes.c_long(k.stride(0)), ctypes.c_long(v.stride(0)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` as rows the C kernels can stride over: each row's heads contiguous."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` with ``cos_sin [P, 2, D]`` (rows ``[cos, cos]``,
    ``[-sin, sin]``) and write the rotated k and ``v`` to the cache at ``slot_mapping``; returns (q, k) rotated."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == q.dtype == cos_sin.dtype
    pos = _as(positions, torch.int64)
    slots = _as(slot_mapping, torch.int64)
    table = cos_sin.contiguous()
    q_out = torch.empty(t, hq, d, dtype=q.dtype)
    k_out = torch.empty(t, hkv, d, dtype=q.dtype)
    _lib().aph_rope_write_kv(_DTYPE_CODES[q.dtype], _ptr(q), ctypes.c_long(q.stride(0)), _ptr(k),
                             ctypes.c_long(k.stride(0)), _ptr(v), ctypes.c_long(v.stride(0)), t, hq, hkv, d,
                             _ptr(pos), _ptr(table), _ptr(q_out), _ptr(k_out), _ptr(k_cache), _ptr(v_cache),
                             _ptr(slots))
    return q_out, k_out


def write_kv_fp8(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Write ``k / k_scale``, ``v / v_scale`` rows ``[T, Hkv, D]`` into an fp8 (e4m3) cache at ``slot_mapping``."""
    k, v = _rows(k), _rows(v)
    slots = _as(slot_mapping, torch.int64)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == torch.float8_e4m3fn
    _lib().aph_write_kv_fp8(_DTYPE_CODES[k.dtype], _ptr(k), _ptr(v), _ptr(k_cache), _ptr(v_cache), _ptr(slots),
                            k.shape[0], k.shape[1] * k.shape[2], ctypes.c_long(k.stride(0)),
                            ctypes.c_long(v.stride(0)), ctypes.c_float(1.0 / k_scale), ctypes.c_float(1.0 / v_scale))


def paged_decode_attention_fp8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               k_scale: float, v_scale: float) -> torch.Tensor:
    """``paged_decode_attention`` over an fp8 (e4m3) cache holding ``k / k_scale`` and ``v / v_scale``."""
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == torch.float8_e4m3fn
    assert d <= 512
    q = q.contiguous()
    tables = _as(block_tables, torch.int32)
    lens = _as(seq_lens, torch.int32)
    out = torch.empty_like(q)
    _lib().aph_paged_decode_attention_fp8(
        _DTYPE_CODES[q.dtype], _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(tables), _ptr(lens), _ptr(out),
        b, hq, hkv, d, block_size, tables.shape[1], ctypes.c_float(scale), ctypes.c_float(k_scale),
        ctypes.c_float(v_scale))
    return out


def e4m3_to_float(codes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Float32 values of fp8 (e4m3) ``codes`` times ``scale`` (the C decoder, for tests)."""
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32)
    _lib().aph_e4m3_to_f32(_ptr(codes), _ptr(out), ctypes.c_long(codes.numel()), ctypes.c_float(scale))
    return out
