"""AutoAWQ checkpoints (``quant_method: awq``, GEMM version): 4-bit weights with zero points.

Layout per linear layer (``in = K``, ``out = N``, ``G`` = group size):
``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[K/G, N/8]``, ``scales`` ``[K/G, N]``; eight output
features share one int32 with AutoAWQ's interleave: nibble ``i`` holds feature ``AWQ_ORDER[i]`` of the
eight. ``w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aphrodite.kernels.int4_matmul import unpack_int4_cols
from aphrodite.modeling.layers.quantization import register_quantization
from aphrodite.modeling.layers.quantization.base import WeightLoader, frozen_parameter
from aphrodite.modeling.layers.quantization.common import get_any
from aphrodite.modeling.layers.quantization.int4 import (
    Int4Config,
    Int4LinearMethod,
    check_int4_config,
    check_shard_sizes,
    full_groups,
)

# AutoAWQ's WQLinear_GEMM packs output features (0..7 of a word) in this nibble order.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@register_quantization
class AWQConfig(Int4Config):
    name = "awq"

    def __init__(self, bits: int = 4, group_size: int = 128, zero_point: bool = True,
                 modules_to_not_convert: list[str] | None = None) -> None:
        check_int4_config(bits, group_size, "AWQ")
        if not zero_point:
            raise ValueError("AWQ without zero points is not supported (AutoAWQ's GEMM format has them).")
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; supported: gemm.")
        if "bits" not in config and "w_bit" not in config:
            raise ValueError("quantization='awq' needs a checkpoint quantized with AutoAWQ (its config.json "
                             "quantization_config); a float checkpoint cannot be quantized to AWQ at load.")
        return cls(bits=int(get_any(config, "bits", "w_bit", default=4)),
                   group_size=int(get_any(config, "group_size", "q_group_size", default=128)),
                   zero_point=bool(get_any(config, "zero_point", default=True)),
                   modules_to_not_convert=config.get("modules_to_not_convert"))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> AWQLinearMethod | None:
        if any(m in prefix for m in self.modules_to_not_convert):   # AutoAWQ matches substrings
            return None
        return AWQLinearMethod(self.group_size)


class AWQLinearMethod(Int4LinearMethod):
    param_names = ("qweight", "qzeros", "scales")

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       weight_loader: WeightLoader) -> None:
        check_shard_sizes(input_size_per_partition, output_partition_sizes, self.group_size, "AWQ")
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        group, groups = full_groups(self.group_size, k)
        sharded_groups = self.group_size != -1 or k == input_size
        group_dim = {"input_dim": 0} if sharded_groups else {}
        self.group = group
        layer.register_parameter("qweight", frozen_parameter(
            (k, n // 8), torch.int32, weight_loader, input_dim=0, output_dim=1, packed_dim=1, packed_factor=8))
        layer.register_parameter("qzeros", frozen_parameter(
            (groups, n // 8), torch.int32, weight_loader, output_dim=1, packed_dim=1, packed_factor=8, **group_dim))
        layer.register_parameter("scales", frozen_parameter(
            (groups, n), params_dtype, weight_loader, output_dim=1, **group_dim))

    def unpack(self, layer: nn.Module):
        codes = unpack_int4_cols(layer.qweight.data, AWQ_ORDER)
        zeros = unpack_int4_cols(layer.qzeros.data, AWQ_ORDER).to(layer.scales.dtype)
        return codes, layer.scales.data, zeros, None, self.group
