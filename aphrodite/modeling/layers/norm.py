"""RMSNorm with an optional fused residual add (the vLLM calling convention).

``forward(x)`` returns the normalised ``x``; ``forward(x, residual)`` first forms
``x + residual`` and returns ``(normalised, x + residual)`` so the decoder layer carries the
un-normalised stream without a separate add. Statistics are computed in float32 and the
result cast back before the weight multiply, exactly as HF Llama does.
``norm_add_norm(first, second, x, residual)`` is ``second(first(x), residual)`` in one pass: the
sandwich of norms between two blocks (Gemma 2/3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.kernels.cpu import ops as cpu_ops
from aphrodite.kernels.rmsnorm import gemma_rms_norm_ref
from aphrodite.modeling.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, same arithmetic
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:   # fused Triton kernels: one pass instead of several elementwise ops
            from aphrodite.kernels.rmsnorm import fused_add_rms_norm, rms_norm
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if x.device.type == "cpu" and cpu_ops.available(x.dtype):   # one C pass
            return cpu_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 (``x_hat * (1 + w)``), and the whole
    computation, weight multiply included, runs in float32 before the cast back (as HF Gemma does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        with torch.no_grad():
            self.weight.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm_ref(x, self.weight, self.eps)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:   # one Triton pass (add, normalise, (1 + w)) instead of several elementwise ops
            from aphrodite.kernels.rmsnorm import gemma_rms_norm
            return gemma_rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def norm_add_norm(first: RMSNorm, second: RMSNorm, x: torch.Tensor,
                  residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``second(first(x), residual)``: ``(second(first(x) + residual), first(x) + residual)``.

    Families that norm a block's output before the residual add (Gemma's post-attention and
    post-feed-forward norms) follow it with the next block's input norm; on CUDA the two norms and
    the add run as one kernel, saving a launch and a round trip of the hidden state per pair."""
    kinds = (type(first), type(second))
    if x.is_cuda and kinds in ((RMSNorm, RMSNorm), (GemmaRMSNorm, GemmaRMSNorm)):
        from aphrodite.kernels.rmsnorm import norm_add_norm as fused
        return fused(x, residual, first.weight, second.weight, first.eps, second.eps,
                     gemma=kinds[0] is GemmaRMSNorm)
    return second(first(x), residual)
