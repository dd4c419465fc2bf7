"""Build a model for a ``ModelConfig`` on a device and fill its weights.

The model is constructed directly on the target device in the target dtype (no CPU copy,
no random init that is then thrown away), then weights stream in tensor by tensor.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from aphrodite.config import ModelConfig
from aphrodite.kernels.cpu import ops as cpu_ops
from aphrodite.kernels.cpu import packed_linear
from aphrodite.modeling.models.registry import get_model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("safetensors", "dummy", "gguf")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    """An unloaded model of ``model_config``'s architecture, its parameters on ``device``."""
    cls = get_model_class(model_config.architecture)
    quant_config = None
    if model_config.quantization is not None:
        from aphrodite.modeling.layers.quantization import get_quantization_config
        quant_config = get_quantization_config(model_config.quantization, model_config.quantization_config or {})
        quant_config.check_device(device)
    with torch.device(device), _default_dtype(model_config.dtype):
        if quant_config is None:
            return cls(model_config.hf_config)
        return cls(model_config.hf_config, quant_config=quant_config)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each layer's quantization method convert its freshly loaded weights (repack, transpose)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


# Checkpoint names of a layer's fp8 KV-cache scales (vLLM's, llm-compressor's, older AutoFP8's), under
# ``...self_attn``: the attribute of its ``Attention`` they set (kv_scale sets both).
KV_SCALE_SUFFIXES = ((".k_scale", ("k_scale",)), (".v_scale", ("v_scale",)),
                     (".k_proj.output_scale", ("k_scale",)), (".v_proj.output_scale", ("v_scale",)),
                     (".kv_scale", ("k_scale", "v_scale")))


def take_kv_cache_scales(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``weights`` through, keeping back the per-layer KV-cache scales: they set the ``k_scale`` /
    ``v_scale`` of the layer's ``Attention`` (used when the cache is fp8; a float, so CUDA graphs bake it)."""
    from aphrodite.modeling.layers.attention import Attention
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, Attention)}
    for name, tensor in weights:
        for suffix, attrs in KV_SCALE_SUFFIXES:
            if name.endswith(suffix):
                attn = layers.get(name[:-len(suffix)] + ".attn")
                if attn is not None:
                    value = float(tensor.materialize() if hasattr(tensor, "materialize") else tensor)
                    for attr in attrs:
                        setattr(attn, attr, value)
                    break
        else:
            yield name, tensor


def load_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    """The model with weights per ``model_config.load_format``, in eval mode, without grads."""
    fmt = model_config.load_format
    if fmt not in LOAD_FORMATS:
        raise ValueError(f"Unknown load_format {fmt!r}; supported: {', '.join(LOAD_FORMATS)}")
    model = build_model(model_config, device)
    if fmt == "dummy":
        from aphrodite.modeling.loader.dummy_loader import initialize_dummy_weights
        initialize_dummy_weights(model, seed=model_config.seed)
    else:
        if fmt == "safetensors":
            from aphrodite.modeling.loader.safetensors_loader import iterate_safetensors_weights
            weights = iterate_safetensors_weights(model_config.path)
        else:
            from aphrodite.modeling.loader.gguf_loader import iterate_gguf_weights
            weights = iterate_gguf_weights(model_config.path, model_config.hf_config,
                                           keep_quantized=model_config.quantization == "gguf")
        with torch.no_grad():
            loaded = model.load_weights(take_kv_cache_scales(model, weights))
        missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
        if missing:
            raise ValueError(f"The {fmt} checkpoint at {model_config.path} lacks weights for "
                             f"{len(missing)} parameters: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
    process_weights_after_loading(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if device.type == "cpu":
        pack_cpu_weights(model, model_config.dtype)
    return model.eval()


# The row-major weights stay beside the packed ones (for the C GEMV that serves decode at batches
# of up to 4 rows bf16 / 3 fp32, up to ~1.5x faster there than oneDNN) while they take at most
# this share of RAM.
KEEP_ROW_MAJOR_RAM_FRACTION = 0.1


def pack_cpu_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Pre-pack the weights that multiply (linear layers and the LM head) for the CPU GEMM.

    The row-major copies are freed when the C GEMV cannot use them or they would take more
    than ``KEEP_ROW_MAJOR_RAM_FRACTION`` of RAM (a large model is not doubled in memory).
    Without oneDNN, fp32 weights go column-major instead, unless the C GEMV (which reads
    row-major) is there."""
    from aphrodite.modeling.layers.linear import LinearBase, pack_cpu_weight
    if not packed_linear.available(dtype):
        if dtype == torch.float32 and not cpu_ops.available(torch.float32):
            use_column_major_weights(model)
        return
    head = getattr(model, "lm_head", None)
    for module in model.modules():
        if isinstance(module, LinearBase) or module is head:
            pack_cpu_weight(module)
    linears = [m for m in model.modules() if isinstance(m, LinearBase) and m.packed_weight is not None]
    row_major = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cpu_ops.available(dtype) and row_major <= KEEP_ROW_MAJOR_RAM_FRACTION * ram:
        return
    logger.info("Freeing %.2f GiB of row-major linear weights (oneDNN's packed copies serve every batch)",
                row_major / 2**30)
    for m in linears:
        m.weight.data = torch.empty(0, dtype=m.weight.dtype)


def use_column_major_weights(model: nn.Module) -> None:
    """Store 2-D weights transposed in memory (same shape, column-major strides) on the CPU.

    MKL's matrix-vector path streams a ``[in, out]``-contiguous weight about 1.35x faster
    than a row-major one, and decode is bound by streaming weights: this is worth ~25% of
    a CPU decode step. Larger batches lose 2-5%, which is the right trade for latency. (fp32
    only: the bf16 kernels showed no such gain.)
    """
    from aphrodite.modeling.layers.embedding import VocabParallelEmbedding
    head = getattr(model, "lm_head", None)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        if isinstance(module, VocabParallelEmbedding) and module is not head:
            continue   # a lookup-only table: its rows stay contiguous
        weight.data = weight.data.t().contiguous().t()
