"""Fused SiLU-and-multiply for gated MLPs (Llama's ``silu(gate) * up`` on a fused gate_up output), its GeGLU
twin, and logit soft-capping (Gemma 2's ``cap * tanh(logits / cap)``).

One pass over ``x`` instead of three or four elementwise kernels; the math runs in fp32 and rounds once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aphrodite.kernels.triton_utils import LazyKernel, cdiv, next_pow2, tl, use_triton

__all__ = ["gelu_tanh_and_mul", "silu_and_mul", "silu_and_mul_ref", "soft_cap", "soft_cap_ref"]


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` in fp32, cast back to ``x.dtype``."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr, GELU: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:   # gelu, tanh approximation (HF gelu_pytorch_tanh): tanh(u) = 1 - 2 / (exp(2u) + 1)
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        y = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)) * up
    else:
        y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_silu_and_mul = LazyKernel(_silu_and_mul_kernel)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x[..., :d]) * x[..., d:]`` (GeGLU) in one Triton pass; ``x`` must be where Triton runs."""
    return silu_and_mul(x, gelu=True)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """x: [..., 2d] -> [..., d]; Triton on CUDA (or under TRITON_INTERPRET), else the reference."""
    d = x.shape[-1] // 2
    assert x.shape[-1] == 2 * d, "last dimension must be even"
    if not use_triton(x):
        if gelu:
            xf = x.float()
            return (F.gelu(xf[..., :d], approximate="tanh") * xf[..., d:]).to(x.dtype)
        ref = silu_and_mul_ref(x)
        if out is None:
            return ref
        out.copy_(ref)
        return out
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    o2 = out.view(-1, d)
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out
    block = min(1024, next_pow2(d))
    grid = (rows, cdiv(d, block))
    _silu_and_mul(x.device)[grid](x2, o2, d, x2.stride(0), o2.stride(0), BLOCK=block, GELU=gelu, num_warps=4)
    return out


def soft_cap_ref(x: torch.Tensor, cap: float) -> torch.Tensor:
    """float32 ``cap * tanh(x / cap)`` (HF Gemma 2's final logit soft-capping, after the cast to float)."""
    return torch.tanh(x.float() / cap) * cap


def _soft_cap_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, cap, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    u = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32) / cap
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)                       # in (0, 1]: no overflow at any logit
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a                                 # near 0, 1 - e cancels: the series to u^7 instead
    t = tl.where(a < 0.05, a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0)))), t)
    tl.store(out_ptr + row * stride_o + offs, cap * tl.where(u < 0, -t, t), mask=mask)


_soft_cap = LazyKernel(_soft_cap_kernel)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``soft_cap_ref`` of ``x [..., V]`` (any float dtype) in one pass that also does the cast to float32, instead
    of a cast, a divide, a tanh and a multiply over the whole vocabulary (Triton on CUDA or under
    TRITON_INTERPRET, else the reference)."""
    if not use_triton(x):
        return soft_cap_ref(x, cap)
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    o2 = out.view(-1, v)
    if x2.shape[0] and v:
        block = min(4096, next_pow2(v))
        _soft_cap(x.device)[(x2.shape[0], cdiv(v, block))](x2, o2, v, x2.stride(0), o2.stride(0), float(cap),
                                                          BLOCK=block, num_warps=4)
    return out
