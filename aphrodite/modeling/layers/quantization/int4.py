"""What every int4 weight-only (W4A16) format shares: the kernel-side form and the forward.

AutoAWQ, GPTQ and compressed-tensors store 4-bit codes, per-group scales and zero points in
different layouts. Each format declares its checkpoint parameters (with the sharding facts the
linear layers' loaders read) and says how to unpack them; after loading, ``Int4LinearMethod``
repacks them once into the canonical layout of ``aphrodite.kernels.int4_matmul`` and drops the
checkpoint tensors, so one kernel family (and one CPU path) serves all three.
"""
from __future__ import annotations

import torch
from torch import nn

from aphrodite.distributed.parallel_state import get_tensor_model_parallel_rank
from aphrodite.kernels.int4_matmul import QuantWeight, quant_matmul, repack_int4
from aphrodite.modeling.layers.quantization.base import LinearMethod, QuantizationConfig

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)


def check_int4_config(bits: int, group_size: int, what: str) -> None:
    if bits != 4:
        raise ValueError(f"{what}: only 4-bit weights are supported, got bits={bits}.")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{what}: group_size {group_size} is not supported; supported: 32, 64, 128, -1.")


def check_shard_sizes(input_size_per_partition: int, output_partition_sizes: list[int], group_size: int,
                      what: str) -> None:
    """Tensor-parallel shards must hold whole groups and whole packed words."""
    if group_size > 0 and input_size_per_partition % group_size:
        raise ValueError(f"{what}: the input features per tensor-parallel rank ({input_size_per_partition}) are "
                         f"not a multiple of the group size ({group_size}); use a smaller tensor_parallel_size.")
    for n in output_partition_sizes:
        if n % 8:
            raise ValueError(f"{what}: output features per rank ({n}) are not a multiple of 8 (packed int4).")


def replicated_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Every rank and every fused projection holds the same whole tensor (e.g. GPTQ act-order scales of a
    row-parallel layer, whose groups do not follow the input shards)."""
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def input_rows_loader(size_per_partition: int, full_size: int):
    """A loader for a per-input-row vector (GPTQ ``g_idx``): this rank's rows, the same for every fused
    projection (they share one input, so one act order)."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[0] != full_size:
            raise ValueError(f"weight shape mismatch: parameter rows {full_size}, checkpoint {tuple(loaded.shape)}")
        start = get_tensor_model_parallel_rank() * size_per_partition if size_per_partition < full_size else 0
        param.data.copy_(loaded.narrow(0, start, size_per_partition))
    return load


def natural_g_idx(param: torch.Tensor, gen: torch.Generator, group: int) -> None:
    """Dummy weights: a valid ``g_idx`` (input row k in group k // group)."""
    param.copy_(torch.arange(param.shape[0], device=param.device) // group)


class Int4LinearMethod(LinearMethod):
    """Subclasses create the checkpoint's parameters and implement ``unpack``."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def unpack(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                torch.Tensor | None, int]:
        """(codes [K, N] 0..15, scales [groups, N], zeros [groups, N] or None for 8, g_idx [K] or None,
        group size) from the loaded checkpoint parameters."""
        raise NotImplementedError

    #: checkpoint parameter names, removed once repacked
    param_names: tuple[str, ...] = ()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes, scales, zeros, g_idx, group = self.unpack(layer)
        qw = repack_int4(codes, scales, zeros, group, g_idx)
        for name in self.param_names:
            if hasattr(layer, name):
                delattr(layer, name)
        # Registered as parameters so the model's memory accounting and .to() see them.
        for name in ("weight", "scales", "zeros", "perm", "g_idx"):
            value = getattr(qw, name)
            if value is not None:
                layer.register_parameter(f"int4_{name}", nn.Parameter(value, requires_grad=False))
                setattr(qw, name, getattr(layer, f"int4_{name}"))
        layer.quant_weight = qw

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        qw: QuantWeight = layer.quant_weight
        shape = x.shape
        out = quant_matmul(x.reshape(-1, shape[-1]), qw, bias)
        return out.reshape(*shape[:-1], qw.n)


def full_groups(group_size: int, size: int) -> tuple[int, int]:
    """(group, number of groups) of ``size`` input features; group_size -1 is one group."""
    group = size if group_size == -1 else group_size
    return group, max(1, size // group)


class Int4Config(QuantizationConfig):
    """Common device check: the Triton kernel on CUDA, the dequantizing path on the CPU."""

    def supported_act_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.bfloat16, torch.float16, torch.float32)
