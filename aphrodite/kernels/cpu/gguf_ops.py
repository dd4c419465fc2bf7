"""PyTorch-facing wrappers of the GGUF kernels in ``gguf_ops.c`` (quantized GEMV, dequantization).

Weights are ``uint8 [N, row_bytes]`` tensors of llama.cpp blocks with a ggml type code (see
``aphrodite.kernels.gguf_matmul.GGML_BLOCKS``). Callers check ``available(dtype)`` and keep the
PyTorch reference (``gguf_matmul.dequantize_reference``) as the fallback.
"""
from __future__ import annotations

import ctypes
from functools import cache

import torch

from aphrodite.kernels.cpu.build import load_library

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def available(dtype: torch.dtype) -> bool:
    """Whether the C kernels handle activations of ``dtype`` on this machine."""
    return dtype in _DTYPE_CODES and load_library() is not None


# Block types the blocked GEMMs (gguf_gemm.c) cover; others keep dequantize + BLAS for many rows.
# ``linear`` takes them for many rows by itself: 8-bit activations from 3 rows, float32 ones from 8.
GEMM_TYPES_BY_NAME = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
GEMM_TYPES = frozenset(GEMM_TYPES_BY_NAME.values())


@cache
def gemm_available() -> bool:
    """Whether the blocked GEMMs run here (a C build with AVX-512 VNNI)."""
    lib = load_library()
    return lib is not None and bool(lib.aph_gguf_gemm_supported())


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _lib(lib: ctypes.CDLL | None = None) -> ctypes.CDLL:
    lib = lib or load_library()
    assert lib is not None, "CPU kernels are not available (check available() first)"
    return lib


def linear(qweight: torch.Tensor, qtype: int, x: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, exact: bool = True, portable: bool = False,
           lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(qweight [N, row_bytes])^T (+ bias)``, reading the blocks.

    ``exact``: float32 activations, so the result is dequantize-then-matmul up to float32
    rounding; otherwise activations are quantized to 8 bits per 32 values (llama.cpp's q8
    scheme: integer dot products, faster, ~0.5% error per product). ``out`` may be a column
    slice of a wider ``[M, *]`` tensor (its rows strided), so fused layers with blocks of
    several types write in place. ``portable`` forces the plain-C loops (tests)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m, k = x2.shape
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype)
    assert out.stride(-1) == 1 and out.dtype == x.dtype and qweight.is_contiguous()
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()   # kept alive in a local: C reads its memory
    ok = _lib(lib).aph_gguf_linear(qtype, _ptr(qweight), ctypes.c_long(qweight.shape[1]), _ptr(x2), _ptr(bias),
                                   _ptr(out), ctypes.c_long(out.stride(0)), m, n, k, _DTYPE_CODES[x.dtype],
                                   int(portable), int(exact))
    if not ok:
        raise ValueError(f"GGUF type {qtype} with K={k} is not supported by the CPU kernels")
    return out


class LinearCall:
    """``linear`` for one fixed weight, with the weight's ctypes arguments built once: decode calls
    ~120 of these per token, and the generic wrapper's checks and conversions cost microseconds each.
    Call ``(x, out=None)`` with ``x [M, K]`` contiguous in a dtype ``available`` accepts."""

    def __init__(self, qweight: torch.Tensor, qtype: int, exact: bool = True) -> None:
        assert qweight.is_contiguous() and qweight.dim() == 2
        self.qweight = qweight   # kept alive: C reads its memory
        self.n = qweight.shape[0]
        self._fn = _lib().aph_gguf_linear
        self._head = (qtype, _ptr(qweight), ctypes.c_long(qweight.shape[1]))
        self._exact = int(exact)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        m, k = x.shape
        if out is None:
            out = torch.empty(m, self.n, dtype=x.dtype)
        ok = self._fn(*self._head, ctypes.c_void_p(x.data_ptr()), None, ctypes.c_void_p(out.data_ptr()),
                      ctypes.c_long(out.stride(0)), m, self.n, k, _DTYPE_CODES[x.dtype], 0, self._exact)
        if not ok:
            raise ValueError(f"GGUF type {self._head[0]} with K={k} is not supported by the CPU kernels")
        return out


def dequantize(qweight: torch.Tensor, qtype: int, k: int, dtype: torch.dtype = torch.float32,
               rows: torch.Tensor | None = None, lib: ctypes.CDLL | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, k]`` values of the blocks of ``qweight`` (all rows, or the rows at ``rows``), into ``out``
    (contiguous ``[R, k]`` of ``dtype``) when given."""
    assert qweight.is_contiguous()
    idx = None if rows is None else rows.to(torch.int64).contiguous()
    r = qweight.shape[0] if idx is None else idx.numel()
    if out is None:
        out = torch.empty(r, k, dtype=dtype)
    assert out.shape == (r, k) and out.dtype == dtype and out.is_contiguous()
    if r:
        _lib(lib).aph_gguf_dequantize(qtype, _ptr(qweight), ctypes.c_long(qweight.shape[1]), _ptr(idx), r, k,
                                      _ptr(out), _DTYPE_CODES[dtype])
    return out
