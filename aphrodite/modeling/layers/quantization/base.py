"""How a linear layer holds and applies its weight: the seam quantized formats plug into.

A ``QuantizationConfig`` is read once from a checkpoint (``quantization_config`` in
config.json, a GGUF file's tensor types, or ``--quantization``) and hands every linear layer
a ``LinearMethod``. The method creates the layer's parameters (a plain ``weight``, or packed
integer weights with scales), fixes them up after loading (repacking, transposing), and
computes ``x @ W^T + b`` with them. The layers themselves only shard: each parameter says
which of its dimensions holds output features (``output_dim``) and input features
(``input_dim``), and by how much a packed dimension is compressed (``packed_dim``,
``packed_factor``), so one weight loader shards every format for tensor parallelism.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[..., None]


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    """Attach sharding facts (``output_dim``, ``input_dim``, ``packed_dim``, ``packed_factor``, ...) to
    ``param``; the layers' weight loaders read them."""
    for key, value in attrs.items():
        if hasattr(param, key) and getattr(param, key) != value:
            raise ValueError(f"parameter attribute {key} is already set")
        setattr(param, key, value)


def frozen_parameter(shape: tuple[int, ...], dtype: torch.dtype | None = None,
                     weight_loader: WeightLoader | None = None, **attrs: Any) -> nn.Parameter:
    """An uninitialised, frozen parameter on the current default device (and dtype unless given)."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    if weight_loader is not None:
        param.weight_loader = weight_loader
    set_weight_attrs(param, **attrs)
    return param


class LinearMethod:
    """Creates, post-processes and applies one linear layer's weights."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        """Register the layer's weight parameters (``layer.register_parameter``).

        ``output_partition_sizes`` are this rank's output features per fused projection (one
        entry for a plain layer, q/k/v or gate/up sizes for fused ones); ``input_size`` and
        ``output_size`` are the unsharded sizes."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack or convert loaded weights into the form ``apply`` wants; default: nothing."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T (+ bias)`` with the layer's weights; ``x`` is ``[T, in_per_rank]``."""
        raise NotImplementedError


class QuantizationConfig:
    """One quantization format's settings, read from a checkpoint."""

    #: The ``--quantization`` name (vLLM's spelling), e.g. ``"awq"``, ``"gptq"``, ``"fp8"``, ``"gguf"``.
    name: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Build from the checkpoint's ``quantization_config`` mapping."""
        raise NotImplementedError

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method for the linear layer named ``prefix`` (e.g. ``model.layers.0.mlp.down_proj``);
        None keeps it unquantized (layers a checkpoint leaves in full precision)."""
        raise NotImplementedError

    def get_embedding_method(self, layer: nn.Module, prefix: str) -> Any:
        """The method of a token embedding / LM head (``create_embedding_weights``, ``embedding``,
        ``apply``); None (the default) keeps the plain float table."""
        return None

    def supported_act_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.bfloat16, torch.float16, torch.float32)

    def check_device(self, device: torch.device) -> None:
        """Raise ``ValueError`` naming what is supported when this format cannot run on ``device``."""
