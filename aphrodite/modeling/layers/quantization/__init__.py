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


# The formats register themselves on import.
from aphrodite.modeling.layers.quantization import gguf as _gguf  # noqa: E402,F401
