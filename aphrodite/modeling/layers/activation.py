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


class GeluAndMul(nn.Module):
    """``gelu(x[..., :d]) * x[..., d:]`` (GeGLU); ``approximate="tanh"`` is HF's ``gelu_pytorch_tanh``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.approximate == "tanh":   # one fused Triton pass
            from aphrodite.kernels.activation import gelu_tanh_and_mul
            return gelu_tanh_and_mul(x)
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


# HF ``hidden_act`` names -> the gated activation that applies them to a fused gate_up output.
_GATED = {
    "silu": SiluAndMul, "swish": SiluAndMul,
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"), "gelu_new": lambda: GeluAndMul("tanh"),
    "gelu_fast": lambda: GeluAndMul("tanh"), "gelu_tanh": lambda: GeluAndMul("tanh"),
    "gelu": GeluAndMul,
}


def get_act_and_mul(name: str) -> nn.Module:
    """The gated activation for HF activation ``name``; ``ValueError`` naming the supported ones."""
    try:
        return _GATED[name]()
    except KeyError:
        raise ValueError(f"Activation {name!r} is not supported for gated MLPs; supported: "
                         f"{', '.join(sorted(_GATED))}") from None
