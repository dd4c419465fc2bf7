"""The gated feed-forward block shared by the dense families: ``down(act(gate(x)) * up(x))``.

gate and up run as one fused column-parallel matmul (checkpoint ``gate_proj``/``up_proj``, or an
already fused ``gate_up_proj`` as in Phi-3), down as a row-parallel one.
"""
from __future__ import annotations

import torch
from torch import nn

from aphrodite.modeling.layers.activation import get_act_and_mul
from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from aphrodite.modeling.layers.quantization import QuantizationConfig


class GatedMLP(nn.Module):
    """SwiGLU (``silu``) or GeGLU (``gelu_pytorch_tanh``, Gemma) MLP over ``hidden_size``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 reduce_results: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj", reduce_results=reduce_results)
        self.act_fn = get_act_and_mul(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))
