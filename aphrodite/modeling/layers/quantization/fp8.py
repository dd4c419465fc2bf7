"""FP8 (e4m3) weights: ``--quantization fp8`` on a float checkpoint, and FP8 checkpoints as published.

* Online (a bf16/fp16 checkpoint with ``--quantization fp8``): weights load in the model dtype and are
  quantized once after loading, one scale per output feature (``amax / 448``).
* ``quant_method: fp8`` checkpoints: per-tensor scales (``weight_scale``, vLLM/AutoFP8 style; fused
  projections' scales become per-feature scales, no requantization), or 128x128 blocks
  (``weight_block_size``, ``weight_scale_inv``, as Qwen3-FP8 and DeepSeek ship).
* compressed-tensors ``float-quantized`` (llm-compressor FP8 / FP8_DYNAMIC) reuses ``Fp8LinearMethod``.

Forward: on the GPU, decode-sized batches (up to ``WEIGHT_ONLY_ROWS`` rows) run the fused dequantizing
Triton kernel on the activations as they are (one launch, no activation pass); larger batches quantize
activations per token (dynamic) or with the checkpoint's static ``input_scale`` and run ``torch._scaled_mm``
with per-channel weight scales. Block-scaled weights always use the Triton kernel. On the CPU the weight is
dequantized and multiplied in the activation dtype.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aphrodite.kernels.fp8_quant import FP8_DTYPE, per_token_quant_fp8, quantize_weight_fp8, scaled_mm_fp8
from aphrodite.kernels.int4_matmul import FMT_FP8, QuantWeight, quant_matmul
from aphrodite.kernels.triton_utils import use_triton
from aphrodite.modeling.layers.quantization import register_quantization
from aphrodite.modeling.layers.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    WeightLoader,
    frozen_parameter,
)
from aphrodite.modeling.layers.quantization.common import is_layer_ignored

#: Rows at or below which the GPU runs weight-only (W8A16) instead of quantizing activations.
WEIGHT_ONLY_ROWS = 16


def check_fp8_device(device: torch.device) -> None:
    """FP8 needs Ada/Hopper (compute capability 8.9+) on CUDA; the CPU dequantizes."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise ValueError(f"FP8 weights need a GPU with compute capability 8.9 or newer (Ada, Hopper, "
                             f"Blackwell); this one has {cap[0]}.{cap[1]}. Supported: those GPUs and the CPU.")


def _shard_index(shard_id: object) -> int:
    if shard_id is None:
        return 0
    if isinstance(shard_id, str):
        return "qkv".index(shard_id)
    return int(shard_id)


def per_shard_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """One value per fused projection (a per-tensor scale); a fused checkpoint tensor sets all of them."""
    if shard_id is None and loaded.numel() == param.numel():
        param.data.copy_(loaded.reshape(param.shape))
        return
    if loaded.numel() != 1:
        raise ValueError(f"a per-tensor scale must hold one value, got shape {tuple(loaded.shape)}")
    param.data[_shard_index(shard_id)] = loaded.reshape(())


class Fp8LinearMethod(LinearMethod):
    """``scheme``: ``"online"`` (quantize at load), ``"tensor"``, ``"channel"`` or ``"block"`` (serialized).

    ``weight_scale_name``: ``weight_scale`` (vLLM, compressed-tensors) or ``weight_scale_inv`` (block)."""

    def __init__(self, scheme: str, static_input: bool = False, block: tuple[int, int] = (128, 128),
                 weight_scale_name: str = "weight_scale") -> None:
        self.scheme = scheme
        self.static_input = static_input
        self.block = block
        self.weight_scale_name = weight_scale_name

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       weight_loader: WeightLoader) -> None:
        n, k = sum(output_partition_sizes), input_size_per_partition
        self.partition_sizes = list(output_partition_sizes)
        dtype = params_dtype if self.scheme == "online" else FP8_DTYPE
        layer.register_parameter("weight", frozen_parameter((n, k), dtype, weight_loader, output_dim=0, input_dim=1))
        shards = len(output_partition_sizes)
        if self.scheme == "tensor":
            layer.register_parameter(self.weight_scale_name, frozen_parameter(
                (shards,), torch.float32, per_shard_loader))
        elif self.scheme == "channel":
            layer.register_parameter(self.weight_scale_name, frozen_parameter(
                (n, 1), torch.float32, weight_loader, output_dim=0))
        elif self.scheme == "block":
            bn, bk = self.block
            if k % bk or any(p % bn for p in output_partition_sizes):
                raise ValueError(f"FP8 block quantization: the per-rank weight shards ({output_partition_sizes} x {k}) "
                                 f"are not whole {bn}x{bk} blocks; use a smaller tensor_parallel_size.")
            layer.register_parameter(self.weight_scale_name, frozen_parameter(
                (n // bn, k // bk), torch.float32, weight_loader, output_dim=0, input_dim=1,
                packed_dim=0, packed_factor=bn))
        elif self.scheme != "online":
            raise ValueError(f"unknown FP8 scheme {self.scheme!r}")
        if self.static_input:
            layer.register_parameter("input_scale", frozen_parameter((shards,), torch.float32, per_shard_loader))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = layer.weight.data
        n, k = w.shape
        if self.scheme == "online":
            q, scale = quantize_weight_fp8(w)
            del layer.weight
            layer.weight = nn.Parameter(q, requires_grad=False)
            scales = scale.reshape(1, n)
            group, scale_bn = k, 1
        else:
            raw = getattr(layer, self.weight_scale_name).data
            if self.scheme == "tensor":
                sizes = torch.tensor(self.partition_sizes, device=raw.device)
                scales = raw.repeat_interleave(sizes).reshape(1, n)
                group, scale_bn = k, 1
            elif self.scheme == "channel":
                scales = raw.reshape(1, n)
                group, scale_bn = k, 1
            else:
                scales = raw.t()                                             # [K/bk, N/bn]
                group, scale_bn = self.block[1], self.block[0]
            delattr(layer, self.weight_scale_name)
        scales = scales.float().contiguous()
        layer.weight_scales = nn.Parameter(scales, requires_grad=False)
        layer.quant_weight = QuantWeight(FMT_FP8, layer.weight, layer.weight_scales, k, n, group, scale_bn)
        if self.static_input:
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(1), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        qw: QuantWeight = layer.quant_weight
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # torch._scaled_mm's per-row scaling writes bf16 only: other activation dtypes stay weight-only.
        if x2.is_cuda and x2.shape[0] > WEIGHT_ONLY_ROWS and self.scheme != "block" and x2.dtype == torch.bfloat16:
            xq, xs = per_token_quant_fp8(x2, layer.input_scale if self.static_input else None)
            out = scaled_mm_fp8(xq, xs, qw.weight, qw.scales, x.dtype, bias)
        elif use_triton(x2) or x2.device.type == "cpu":
            out = quant_matmul(x2, qw, bias)
        else:
            raise RuntimeError(f"FP8 weights cannot run on {x2.device}")
        return out.reshape(*shape[:-1], qw.n)


@register_quantization
class Fp8Config(QuantizationConfig):
    name = "fp8"

    def __init__(self, serialized: bool, activation_scheme: str = "dynamic",
                 weight_block_size: list[int] | None = None, ignored_layers: list[str] | None = None) -> None:
        if activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"FP8 activation_scheme {activation_scheme!r} is not supported; "
                             "supported: dynamic, static.")
        if weight_block_size is not None and (len(weight_block_size) != 2 or not serialized):
            raise ValueError("FP8 weight_block_size needs an FP8 checkpoint and two sizes, e.g. [128, 128].")
        if not serialized and activation_scheme == "static":
            raise ValueError("FP8 static activation scales need an FP8 checkpoint that provides them.")
        self.serialized = serialized
        self.activation_scheme = activation_scheme
        self.block = tuple(weight_block_size) if weight_block_size else None
        self.ignored_layers = list(ignored_layers or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        serialized = str(config.get("quant_method", "")).lower() == "fp8" or "is_checkpoint_fp8_serialized" in config
        return cls(serialized=serialized, activation_scheme=str(config.get("activation_scheme", "dynamic")),
                   weight_block_size=config.get("weight_block_size"),
                   ignored_layers=config.get("ignored_layers") or config.get("modules_to_not_convert"))

    def check_device(self, device: torch.device) -> None:
        check_fp8_device(device)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> Fp8LinearMethod | None:
        if is_layer_ignored(prefix, self.ignored_layers):
            return None
        if not self.serialized:
            return Fp8LinearMethod("online")
        if self.block is not None:
            return Fp8LinearMethod("block", block=self.block, weight_scale_name="weight_scale_inv")
        return Fp8LinearMethod("tensor", static_input=self.activation_scheme == "static")
