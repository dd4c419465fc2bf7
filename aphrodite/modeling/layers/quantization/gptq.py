"""GPTQ checkpoints (``quant_method: gptq``; AutoGPTQ / GPTQModel), 4-bit, with or without act-order.

Layout per linear layer (``in = K``, ``out = N``, ``G`` = group size):
``qweight`` int32 ``[K/8, N]`` (eight consecutive input rows per word, row ``8i + j`` in nibble ``j``),
``qzeros`` int32 ``[K/G, N/8]`` (eight consecutive output features per word), ``scales`` ``[K/G, N]``,
``g_idx`` int32 ``[K]`` (group of each input row: ``k // G``, or an act-order permutation's).
The ``gptq`` checkpoint format stores zero points minus one (``w = (q - (z + 1)) * s``); ``gptq_v2``
stores them as they are.

Act-order (``desc_act``) rows are sorted by group once at load (the kernel gathers the input columns
through the permutation). For a row-parallel layer each rank's rows span every group, so its scales
and zero points are loaded whole on every rank, as vLLM does.
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
    input_rows_loader,
    natural_g_idx,
    replicated_loader,
)


@register_quantization
class GPTQConfig(Int4Config):
    name = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 128, desc_act: bool = False, sym: bool = True,
                 checkpoint_format: str = "gptq") -> None:
        check_int4_config(bits, group_size, "GPTQ")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                             "supported: gptq, gptq_v2.")
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.zero_offset = 1 if checkpoint_format == "gptq" else 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        if "bits" not in config:
            raise ValueError("quantization='gptq' needs a checkpoint quantized with GPTQ (its config.json "
                             "quantization_config); a float checkpoint cannot be quantized to GPTQ at load.")
        return cls(bits=int(config["bits"]), group_size=int(get_any(config, "group_size", default=128)),
                   desc_act=bool(get_any(config, "desc_act", default=False)),
                   sym=bool(get_any(config, "sym", default=True)),
                   checkpoint_format=str(get_any(config, "checkpoint_format", default="gptq")).lower())

    def get_linear_method(self, layer: nn.Module, prefix: str) -> GPTQLinearMethod:
        return GPTQLinearMethod(self)


class GPTQLinearMethod(Int4LinearMethod):
    param_names = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config.group_size)
        self.config = config

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       weight_loader: WeightLoader) -> None:
        check_shard_sizes(input_size_per_partition, output_partition_sizes, self.group_size, "GPTQ")
        if input_size_per_partition % 8:
            raise ValueError(f"GPTQ: input features per rank ({input_size_per_partition}) must be a multiple of 8.")
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        row_sharded = k != input_size
        # Act-order or per-channel (-1) groups do not follow the input shards: keep them whole.
        whole_groups = row_sharded and (self.config.desc_act or self.group_size == -1)
        self.group, groups = full_groups(self.group_size, input_size if whole_groups else k)
        group_loader = replicated_loader if whole_groups and len(output_partition_sizes) == 1 else weight_loader
        group_dim = {} if whole_groups else {"input_dim": 0}
        layer.register_parameter("qweight", frozen_parameter(
            (k // 8, n), torch.int32, weight_loader, input_dim=0, output_dim=1, packed_dim=0, packed_factor=8))
        layer.register_parameter("qzeros", frozen_parameter(
            (groups, n // 8), torch.int32, group_loader, output_dim=1, packed_dim=1, packed_factor=8, **group_dim))
        layer.register_parameter("scales", frozen_parameter(
            (groups, n), params_dtype, group_loader, output_dim=1, **group_dim))
        g_idx = frozen_parameter((k,), torch.int32, input_rows_loader(k, input_size), input_dim=0)
        g_idx.dummy_init = lambda p, gen, g=self.group, off=0: natural_g_idx(p, gen, g)
        layer.register_parameter("g_idx", g_idx)
        self.row_sharded = row_sharded

    def unpack(self, layer: nn.Module):
        qw = layer.qweight.data                                            # [K/8, N], packed along K
        codes = unpack_int4_cols(qw.t().contiguous()).t()                 # [K, N]
        zeros = (unpack_int4_cols(layer.qzeros.data).to(torch.int32) + self.config.zero_offset)
        zeros = zeros.to(layer.scales.dtype)
        if self.config.sym and bool((zeros == 8).all()):
            zeros = None
        g_idx = layer.g_idx.data if self.config.desc_act else None
        return codes.contiguous(), layer.scales.data, zeros, g_idx, self.group
