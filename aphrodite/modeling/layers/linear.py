"""Linear layers that hold one tensor-parallel shard of their weight.

Column-parallel layers split the output features across ranks (no communication needed),
row-parallel layers split the input features and sum the partial products with an
all-reduce. Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``
that copies this rank's slice of a full checkpoint tensor, so model code maps checkpoint
names once and never slices by hand. Fused layers (q/k/v, gate/up) take a ``shard_id``
saying which of the fused checkpoint tensors is being loaded.

What the weight *is* belongs to the layer's ``LinearMethod`` (plain, or one of the quantized
formats in ``layers/quantization``); the loaders shard any of them by the dimensions each
parameter declares (``output_dim``, ``input_dim``, ``packed_dim``/``packed_factor``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.distributed.communication import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from aphrodite.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from aphrodite.kernels.cpu import ops as cpu_ops
from aphrodite.kernels.cpu import packed_linear
from aphrodite.modeling.layers.quantization.base import (
    LinearMethod,
    QuantizationConfig,
    frozen_parameter,
)

WeightLoader = Callable[..., None]


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
          packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with two CPU shortcuts: a few rows stream the weight through the C GEMV
    (decode at small batch is bound by reading weights, which it does faster than BLAS), and
    more rows use ``packed``, the weight pre-packed for oneDNN, when the layer has one."""
    if x.device.type == "cpu":
        if cpu_ops.use_gemv(x, weight, packed is not None):
            return cpu_ops.linear(x, weight, bias)
        if packed is not None:
            return packed_linear.linear(x, packed, bias)
    return F.linear(x, weight, bias)


def pack_cpu_weight(module: nn.Module) -> None:
    """Give ``module`` a ``packed_weight`` (oneDNN layout) of its CPU weight, for ``dense``."""
    weight = getattr(module, "weight", None)
    if not isinstance(getattr(module, "quant_method", None), (UnquantizedLinearMethod, type(None))):
        return
    if weight is not None and packed_linear.supports(weight):
        module.packed_weight = packed_linear.pack(weight)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


def new_parameter(shape: tuple[int, ...], weight_loader: WeightLoader) -> nn.Parameter:
    """An uninitialised, frozen parameter on the current default device/dtype, with its loader."""
    return frozen_parameter(shape, weight_loader=weight_loader)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src`` into ``dst`` (casting dtype/device) after checking the shapes agree."""
    if dst.shape != src.shape:
        raise ValueError(f"weight shape mismatch: parameter {tuple(dst.shape)}, "
                         f"checkpoint {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """Loader for unsharded parameters: the checkpoint tensor is copied whole."""
    copy_into(param.data, loaded_weight)


def _units(param: torch.Tensor, dim: int, features: int) -> int:
    """``features`` counted in ``param``'s storage units along ``dim`` (packed dims hold several)."""
    if getattr(param, "packed_dim", None) == dim:
        return features // param.packed_factor
    return features


class UnquantizedLinearMethod(LinearMethod):
    """A plain ``[out, in]`` weight in the model dtype; the CPU fast paths live in ``dense``."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        weight = frozen_parameter((sum(output_partition_sizes), input_size_per_partition), params_dtype,
                                  weight_loader, output_dim=0, input_dim=1)
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return dense(x, layer.weight, bias, layer.packed_weight)


class LinearBase(nn.Module):
    """One rank's shard of ``y = x W^T + b``; the weight's form is the ``quant_method``'s.

    ``in_features``/``out_features`` are per rank; ``output_partition_sizes`` split the
    output of fused layers into their projections (per rank)."""

    packed_weight: torch.Tensor | None = None   # set after loading, see ``pack_cpu_weight``

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 output_partition_sizes: Sequence[int] | None = None,
                 input_size: int | None = None, output_size: int | None = None) -> None:
        super().__init__()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.in_features = in_features      # per rank
        self.out_features = out_features    # per rank
        self.prefix = prefix
        method = quant_config.get_linear_method(self, prefix) if quant_config is not None else None
        self.quant_method: LinearMethod = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(
            self, in_features, list(output_partition_sizes or [out_features]), input_size or in_features,
            output_size or out_features, torch.get_default_dtype(), self.weight_loader)
        if bias:
            self.bias = frozen_parameter((out_features,), weight_loader=self.weight_loader, output_dim=0)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp_size={self.tp_size}, "
                f"quant_method={type(self.quant_method).__name__}")


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, bias, quant_config, prefix)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        copy_into(param.data, loaded_weight)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows ``[r*n, (r+1)*n)`` of the weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 gather_output: bool = False, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", output_partition_sizes: Sequence[int] | None = None) -> None:
        tp_size = get_tensor_model_parallel_world_size()
        super().__init__(input_size, _divide(output_size, tp_size, "output size"), bias, quant_config, prefix,
                         output_partition_sizes, input_size, output_size)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        d = getattr(param, "output_dim", None)
        if d is None:
            copy_into(param.data, loaded_weight)
            return
        n = param.shape[d]
        copy_into(param.data, loaded_weight.narrow(d, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        if self.gather_output and self.tp_size > 1:
            out = tensor_model_parallel_all_gather(out, dim=-1)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (e.g. gate+up).

    Each rank's weight is the concatenation of its shard of every projection, so the output
    splits locally into the per-projection pieces. ``shard_id`` is the projection's index.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 gather_output: bool = False, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        self.output_sizes = list(output_sizes)
        tp_size = get_tensor_model_parallel_world_size()
        parts = [_divide(n, tp_size, "output size") for n in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, gather_output, quant_config, prefix, parts)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        d = getattr(param, "output_dim", None)
        if shard_id is None:  # an already-fused checkpoint tensor: split it into its projections
            if d is None:
                copy_into(param.data, loaded_weight)
                return
            offset = 0
            for i, size in enumerate(self.output_sizes):
                size = _units(param, d, size)
                self.weight_loader(param, loaded_weight.narrow(d, offset, size), i)
                offset += size
            return
        assert isinstance(shard_id, int)
        if d is None:  # one value per projection (e.g. a per-tensor scale)
            copy_into(param.data[shard_id], loaded_weight.reshape(param.data[shard_id].shape))
            return
        size = _units(param, d, self.output_sizes[shard_id] // self.tp_size)
        offset = _units(param, d, sum(self.output_sizes[:shard_id]) // self.tp_size)
        copy_into(param.data.narrow(d, offset, size), loaded_weight.narrow(d, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection, split by attention head across ranks.

    With fewer KV heads than ranks, each KV head is replicated on ``tp_size // num_kv_heads``
    consecutive ranks. ``shard_id`` is ``"q"``, ``"k"`` or ``"v"``.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        tp_size = get_tensor_model_parallel_world_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            _divide(tp_size, total_num_kv_heads, "tensor-parallel size vs KV heads")
            self.num_kv_heads = 1
            self.kv_replicas = tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.kv_replicas = 1
        self.q_size = self.num_heads * head_size      # per rank
        self.kv_size = self.num_kv_heads * head_size  # per rank
        out_total = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp_size
        super().__init__(hidden_size, out_total, bias, quant_config=quant_config, prefix=prefix,
                         output_partition_sizes=[self.q_size, self.kv_size, self.kv_size])

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        d = getattr(param, "output_dim", None)
        if shard_id is None:  # an already-fused checkpoint tensor
            if d is None:
                copy_into(param.data, loaded_weight)
                return
            q = _units(param, d, self.total_num_heads * self.head_size)
            kv = _units(param, d, self.total_num_kv_heads * self.head_size)
            for sid, piece in zip("qkv", loaded_weight.split([q, kv, kv], dim=d), strict=True):
                self.weight_loader(param, piece, sid)
            return
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        if d is None:  # one value per projection (e.g. a per-tensor scale)
            i = "qkv".index(shard_id)
            copy_into(param.data[i], loaded_weight.reshape(param.data[i].shape))
            return
        if shard_id == "q":
            offset, size, src_rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, src_rank = self.kv_size, self.tp_rank // self.kv_replicas
        offset, size = _units(param, d, offset), _units(param, d, size)
        copy_into(param.data.narrow(d, offset, size), loaded_weight.narrow(d, src_rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce.

    The input is expected already split (the output of a column-parallel layer). The bias
    is added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 reduce_results: bool = True, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        tp_size = get_tensor_model_parallel_world_size()
        super().__init__(_divide(input_size, tp_size, "input size"), output_size, bias, quant_config, prefix,
                         input_size=input_size, output_size=output_size)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        d = getattr(param, "input_dim", None)
        if d is None or param is self.bias:  # replicated (the bias, per-output-channel scales)
            copy_into(param.data, loaded_weight)
            return
        n = param.shape[d]
        copy_into(param.data, loaded_weight.narrow(d, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        out = self.quant_method.apply(self, x)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
