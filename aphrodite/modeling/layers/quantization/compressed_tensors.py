"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, written by llm-compressor).

Supported schemes (one config group targeting ``Linear``, others listed in ``ignore``):
* ``pack-quantized`` W4A16: ``weight_packed`` int32 ``[N, K/8]`` (eight consecutive input features per
  word, codes stored as ``q + 8``), ``weight_scale`` ``[N, K/G]``, and for asymmetric schemes
  ``weight_zero_point`` int32 ``[N/8, K/G]`` packed the same way along the output features;
  ``weight_shape`` is informational. Group, or channel strategy (one group over all inputs).
* ``float-quantized`` / ``naive-quantized`` FP8 (e4m3): ``weight`` fp8 ``[N, K]``, ``weight_scale`` per
  channel ``[N, 1]`` or per tensor, activations dynamic per token or static per tensor (``input_scale``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aphrodite.kernels.int4_matmul import unpack_int4_cols
from aphrodite.modeling.layers.quantization import register_quantization
from aphrodite.modeling.layers.quantization.base import LinearMethod, QuantizationConfig, WeightLoader, frozen_parameter
from aphrodite.modeling.layers.quantization.common import is_layer_ignored
from aphrodite.modeling.layers.quantization.fp8 import Fp8LinearMethod, check_fp8_device
from aphrodite.modeling.layers.quantization.int4 import Int4LinearMethod, check_int4_config, check_shard_sizes


def _ignore_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """``weight_shape`` restates the layer's shape; nothing to keep."""


@register_quantization
class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, weights: dict[str, Any], input_activations: dict[str, Any] | None, fmt: str,
                 ignore: list[str]) -> None:
        self.weights = weights
        self.input_activations = input_activations
        self.format = fmt
        self.ignore = ignore
        kind, bits = weights.get("type", "int"), int(weights.get("num_bits", 0))
        strategy = weights.get("strategy")
        if kind == "int" and fmt == "pack-quantized" and input_activations is None:
            check_int4_config(bits, int(weights.get("group_size") or -1), "compressed-tensors")
            if strategy not in ("group", "channel"):
                raise ValueError(f"compressed-tensors W4A16 strategy {strategy!r} is not supported; "
                                 "supported: group, channel.")
            if weights.get("actorder") not in (None, "weight", False):
                raise ValueError("compressed-tensors W4A16 with group act-order (weight_g_idx) is not supported.")
            self.scheme = "w4a16"
        elif kind == "float" and bits == 8 and fmt in ("float-quantized", "naive-quantized"):
            if strategy not in ("tensor", "channel"):
                raise ValueError(f"compressed-tensors FP8 weight strategy {strategy!r} is not supported; "
                                 "supported: tensor, channel.")
            act = input_activations or {}
            if act and not (act.get("type") == "float" and int(act.get("num_bits", 0)) == 8):
                raise ValueError("compressed-tensors FP8 weights need FP8 (or no) input activations.")
            if act and not act.get("dynamic") and act.get("strategy") != "tensor":
                raise ValueError("compressed-tensors FP8: static input activations must be per tensor.")
            self.scheme = "fp8"
        else:
            raise ValueError(f"compressed-tensors scheme (format {fmt!r}, weights {kind} {bits}-bit, input "
                             f"activations {input_activations}) is not supported; supported: pack-quantized "
                             "W4A16 (group or channel) and float-quantized FP8 (W8A8 / FP8_DYNAMIC).")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        groups = config.get("config_groups") or {}
        linear = [g for g in groups.values() if "Linear" in (g.get("targets") or [])]
        if len(linear) != 1:
            raise ValueError("compressed-tensors: exactly one config group targeting Linear is supported, "
                             f"got {len(linear)}.")
        group = linear[0]
        fmt = group.get("format") or config.get("format") or "dense"
        return cls(group.get("weights") or {}, group.get("input_activations"), str(fmt),
                   list(config.get("ignore") or []))

    def check_device(self, device: torch.device) -> None:
        if self.scheme == "fp8":
            check_fp8_device(device)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if is_layer_ignored(prefix, self.ignore):
            return None
        if self.scheme == "w4a16":
            return CompressedTensorsW4A16Method(self.weights)
        act = self.input_activations
        return Fp8LinearMethod(self.weights["strategy"], static_input=bool(act) and not act.get("dynamic"))


class CompressedTensorsW4A16Method(Int4LinearMethod):
    param_names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")

    def __init__(self, weights: dict[str, Any]) -> None:
        super().__init__(int(weights.get("group_size") or -1) if weights.get("strategy") == "group" else -1)
        self.symmetric = bool(weights.get("symmetric", True))

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       weight_loader: WeightLoader) -> None:
        check_shard_sizes(input_size_per_partition, output_partition_sizes, self.group_size, "compressed-tensors")
        n, k = sum(output_partition_sizes), input_size_per_partition
        if k % 8:
            raise ValueError(f"compressed-tensors: input features per rank ({k}) must be a multiple of 8.")
        channel = self.group_size == -1
        self.group = k if channel else self.group_size
        groups = 1 if channel else k // self.group
        group_dim = {} if channel else {"input_dim": 1}
        layer.register_parameter("weight_packed", frozen_parameter(
            (n, k // 8), torch.int32, weight_loader, output_dim=0, input_dim=1, packed_dim=1, packed_factor=8))
        layer.register_parameter("weight_scale", frozen_parameter(
            (n, groups), params_dtype, weight_loader, output_dim=0, **group_dim))
        if not self.symmetric:
            layer.register_parameter("weight_zero_point", frozen_parameter(
                (n // 8, groups), torch.int32, weight_loader, output_dim=0, packed_dim=0, packed_factor=8,
                **group_dim))
        layer.register_parameter("weight_shape", frozen_parameter((2,), torch.int64, _ignore_loader))
        layer.weight_shape.dummy_init = lambda p, gen: None

    def unpack(self, layer: nn.Module):
        codes = unpack_int4_cols(layer.weight_packed.data).t().contiguous()       # [K, N]
        scales = layer.weight_scale.data.t().contiguous()                          # [groups, N]
        zeros = None
        if not self.symmetric:
            zeros = unpack_int4_cols(layer.weight_zero_point.data.t().contiguous()).to(scales.dtype)  # [groups, N]
        return codes, scales, zeros, None, self.group
