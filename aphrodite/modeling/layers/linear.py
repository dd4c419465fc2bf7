"""Linear layers that hold one tensor-parallel shard of their weight.

Column-parallel layers split the output features across ranks (no communication needed),
row-parallel layers split the input features and sum the partial products with an
all-reduce. Every parameter carries ``weight_loader(param, loaded_weight, shard_id=None)``
that copies this rank's slice of a full checkpoint tensor, so model code maps checkpoint
names once and never slices by hand. Fused layers (q/k/v, gate/up) take a ``shard_id``
saying which of the fused checkpoint tensors is being loaded.
"""
from __future__ import annotations

from collections.abc import Callable

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
    if weight is not None and packed_linear.supports(weight):
        module.packed_weight = packed_linear.pack(weight)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


def new_parameter(shape: tuple[int, ...], weight_loader: WeightLoader) -> nn.Parameter:
    """An uninitialised, frozen parameter on the current default device/dtype, with its loader."""
    param = nn.Parameter(torch.empty(shape), requires_grad=False)
    param.weight_loader = weight_loader
    return param


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


class LinearBase(nn.Module):
    """Weight ``[out_per_rank, in_per_rank]`` and optional bias ``[out_per_rank]``."""

    packed_weight: torch.Tensor | None = None   # set after loading, see ``pack_cpu_weight``

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        self.in_features = in_features      # per rank
        self.out_features = out_features    # per rank
        self.weight = new_parameter((out_features, in_features), self.weight_loader)
        if bias:
            self.bias = new_parameter((out_features,), self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp_size={self.tp_size}")


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        copy_into(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias, self.packed_weight)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows ``[r*n, (r+1)*n)`` of the weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 gather_output: bool = False) -> None:
        tp_size = get_tensor_model_parallel_world_size()
        super().__init__(input_size, _divide(output_size, tp_size, "output size"), bias)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        n = param.shape[0]
        copy_into(param.data, loaded_weight.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = dense(x, self.weight, self.bias, self.packed_weight)
        if self.gather_output and self.tp_size > 1:
            out = tensor_model_parallel_all_gather(out, dim=-1)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (e.g. gate+up).

    Each rank's weight is the concatenation of its shard of every projection, so the output
    splits locally into the per-projection pieces. ``shard_id`` is the projection's index.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 gather_output: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, gather_output)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor: split it into its projections
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(0, offset, size), i)
                offset += size
            return
        assert isinstance(shard_id, int)
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        copy_into(param.data.narrow(0, offset, size), loaded_weight.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection, split by attention head across ranks.

    With fewer KV heads than ranks, each KV head is replicated on ``tp_size // num_kv_heads``
    consecutive ranks. ``shard_id`` is ``"q"``, ``"k"`` or ``"v"``.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False) -> None:
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
        super().__init__(hidden_size, out_total, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor
            q = self.total_num_heads * self.head_size
            kv = self.total_num_kv_heads * self.head_size
            for sid, piece in zip("qkv", loaded_weight.split([q, kv, kv], dim=0), strict=True):
                self.weight_loader(param, piece, sid)
            return
        if shard_id == "q":
            offset, size, src_rank = 0, self.q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, src_rank = self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        copy_into(param.data.narrow(0, offset, size), loaded_weight.narrow(0, src_rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce.

    The input is expected already split (the output of a column-parallel layer). The bias
    is added once, after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 reduce_results: bool = True) -> None:
        tp_size = get_tensor_model_parallel_world_size()
        super().__init__(_divide(input_size, tp_size, "input size"), output_size, bias)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            copy_into(param.data, loaded_weight)
            return
        n = param.shape[1]
        copy_into(param.data, loaded_weight.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return dense(x, self.weight, self.bias, self.packed_weight)
        out = dense(x, self.weight, packed=self.packed_weight)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
