"""Quantized weight formats, found by name (``--quantization``) or from a checkpoint's config.

Each format registers its ``QuantizationConfig`` class in ``QUANTIZATION_METHODS``; the
loader asks ``get_quantization_config`` for the one a model needs.
"""
from __future__ import annotations

from typing import Any

from aphrodite.modeling.layers.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    frozen_parameter,
    set_weight_attrs,
)

__all__ = ["QUANTIZATION_METHODS", "LinearMethod", "QuantizationConfig", "frozen_parameter",
           "get_quantization_config", "register_quantization", "set_weight_attrs"]

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {}


def register_quantization(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    QUANTIZATION_METHODS[cls.name] = cls
    return cls


def get_quantization_config(method: str, config: dict[str, Any]) -> QuantizationConfig:
    """The config object of ``method`` built from a ``quantization_config`` mapping."""
    cls = QUANTIZATION_METHODS.get(method)
    if cls is None:
        supported = ", ".join(sorted(QUANTIZATION_METHODS)) or "none"
        raise ValueError(f"Quantization method {method!r} is not supported. Supported methods: {supported}.")
    return cls.from_config(config)


#: Other names users and tools give the same formats (vLLM's kernel-specific spellings).
QUANTIZATION_ALIASES: dict[str, str] = {
    "awq_marlin": "awq", "gptq_marlin": "gptq", "compressed_tensors": "compressed-tensors",
}


def canonical_method(name: str) -> str:
    """``name`` lower-cased with aliases resolved (``awq_marlin`` -> ``awq``)."""
    name = name.lower()
    return QUANTIZATION_ALIASES.get(name, name)


# The formats register themselves on import.
from aphrodite.modeling.layers.quantization import awq, compressed_tensors, fp8, gguf, gptq  # noqa: E402,F401
