"""Fused SiLU-and-multiply for gated MLPs (Llama's ``silu(gate) * up`` on a fused gate_up output).

One pass over ``x`` instead of three elementwise kernels; the math runs in fp32 and rounds once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aphrodite.kernels.triton_utils import LazyKernel, cdiv, next_pow2, tl, use_triton

__all__ = ["silu_and_mul", "silu_and_mul_ref"]


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
