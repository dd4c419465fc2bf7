"""Gated activations for fused gate/up projections."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.kernels.cpu import ops as cpu_ops


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]``: the SwiGLU of a fused gate_up output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:   # one fused Triton pass
            from aphrodite.kernels.activation import silu_and_mul
            return silu_and_mul(x)
        if x.device.type == "cpu" and cpu_ops.available(x.dtype):
            return cpu_ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
