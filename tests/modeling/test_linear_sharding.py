"""The linear layers shard any weight format by the dimensions its parameters declare.

A toy format stores its weight transposed (``[in, out]``) with the output dimension packed
two features per unit, plus one scale per fused projection: each rank's shard must equal the
slice of the full tensors a reference computes by hand."""
from __future__ import annotations

import pytest
import torch

from aphrodite.distributed.parallel_state import set_tensor_model_parallel
from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from aphrodite.modeling.layers.quantization import LinearMethod, QuantizationConfig, frozen_parameter


class _PackedTransposed(LinearMethod):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, weight_loader):
        out = sum(output_partition_sizes)
        layer.register_parameter("qweight", frozen_parameter(
            (input_size_per_partition, out // 2), torch.float32, weight_loader,
            output_dim=1, input_dim=0, packed_dim=1, packed_factor=2))
        layer.register_parameter("scale", frozen_parameter((len(output_partition_sizes),), torch.float32,
                                                           weight_loader))


class _Config(QuantizationConfig):
    name = "toy"

    def get_linear_method(self, layer, prefix):
        return _PackedTransposed()


@pytest.fixture
def two_ranks():
    yield
    set_tensor_model_parallel(0, 1)


def _pack(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [in, out/2]: (even, odd) output features of a column summed into one unit (lossy, but
    a one-to-one function of the slice, which is all the sharding check needs)."""
    t = w.t()
    return t[:, 0::2] * 1000 + t[:, 1::2]


@pytest.mark.parametrize("rank", [0, 1])
def test_merged_column_shards_packed_output_dim(two_ranks, rank):
    set_tensor_model_parallel(rank, 2)
    layer = MergedColumnParallelLinear(6, [8, 4], quant_config=_Config(), prefix="mlp.gate_up_proj")
    gate, up = torch.randn(8, 6), torch.randn(4, 6)
    layer.weight_loader(layer.qweight, _pack(gate), 0)
    layer.weight_loader(layer.qweight, _pack(up), 1)
    layer.weight_loader(layer.scale, torch.tensor(3.0), 0)
    layer.weight_loader(layer.scale, torch.tensor(5.0), 1)
    expect = torch.cat([_pack(gate[rank * 4:(rank + 1) * 4]), _pack(up[rank * 2:(rank + 1) * 2])], dim=1)
    assert torch.equal(layer.qweight, expect)
    assert layer.scale.tolist() == [3.0, 5.0]


@pytest.mark.parametrize("rank", [0, 1])
def test_qkv_shards_packed_output_dim_with_replicated_kv_head(two_ranks, rank):
    set_tensor_model_parallel(rank, 2)
    # 4 query heads of size 2, one KV head: each rank holds 2 query heads and the (replicated) KV head.
    layer = QKVParallelLinear(6, 2, 4, 1, quant_config=_Config())
    q, k, v = torch.randn(8, 6), torch.randn(2, 6), torch.randn(2, 6)
    layer.weight_loader(layer.qweight, _pack(torch.cat([q, k, v])))   # a fused checkpoint tensor
    expect = torch.cat([_pack(q[rank * 4:(rank + 1) * 4]), _pack(k), _pack(v)], dim=1)
    assert torch.equal(layer.qweight, expect)


@pytest.mark.parametrize("rank", [0, 1])
def test_row_parallel_shards_input_dim(two_ranks, rank):
    set_tensor_model_parallel(rank, 2)
    layer = RowParallelLinear(8, 4, bias=True, quant_config=_Config())
    w, b = torch.randn(4, 8), torch.randn(4)
    layer.weight_loader(layer.qweight, _pack(w))
    layer.weight_loader(layer.bias, b)
    assert torch.equal(layer.qweight, _pack(w)[rank * 4:(rank + 1) * 4])
    assert torch.equal(layer.bias, b)


def test_unknown_quantization_method_is_a_clear_error(tmp_path):
    import json

    from aphrodite.config import create_engine_config
    from aphrodite.engine_args import EngineArgs
    from tests.conftest import save_tiny_hf_model
    path = save_tiny_hf_model(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes-9000"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'bitsandbytes-9000' is not supported"):
        create_engine_config(EngineArgs(model=str(path)))
