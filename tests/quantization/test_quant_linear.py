"""Quantized linear layers in every format vs the float64 weight each checkpoint stands for, on one rank
and sharded over two (the loaders must cut packed words, groups and blocks at the right places)."""
from __future__ import annotations

import pytest
import torch

from aphrodite.distributed.parallel_state import set_tensor_model_parallel
from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from aphrodite.modeling.loader import process_weights_after_loading
from tests.quantization.formats import FORMATS, INT4_FORMATS, make_config, write_layer


@pytest.fixture
def ranks():
    yield
    set_tensor_model_parallel(0, 1)


def _load(layer, tensors: dict[str, torch.Tensor], shard_id: object) -> None:
    for name, t in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, t, shard_id)


def _run(layer, x: torch.Tensor) -> torch.Tensor:
    """This rank's output (before a row-parallel layer's all-reduce, which the test does by summing)."""
    process_weights_after_loading(layer)
    with torch.no_grad():
        return layer.quant_method.apply(layer, x, layer.bias).double()


@pytest.mark.parametrize("interpret", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_column_two_ranks(ranks, monkeypatch, fmt, interpret):
    """gate/up of a tiny MLP: each rank's output is its slice of every projection's reference output."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(1)
    k, sizes = 64, [64, 32]
    ws = [torch.randn(n, k) * 0.2 for n in sizes]
    ckpts = [write_layer(fmt, w) for w in ws]
    x = torch.randn(3, k)
    for tp in (1, 2):
        outs = []
        for rank in range(tp):
            set_tensor_model_parallel(rank, tp)
            layer = MergedColumnParallelLinear(k, sizes, quant_config=make_config(fmt),
                                               prefix="model.layers.0.mlp.gate_up_proj")
            for i, (tensors, _) in enumerate(ckpts):
                _load(layer, tensors, i)
            outs.append(_run(layer, x))
        for rank, out in enumerate(outs):
            parts = out.split([n // tp for n in sizes], dim=-1)
            for (_, ref_w), n, part in zip(ckpts, sizes, parts):
                ref = x.double() @ ref_w[rank * n // tp:(rank + 1) * n // tp].t()
                torch.testing.assert_close(part, ref, rtol=0, atol=2e-5 * ref.abs().max().item() + 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_qkv_and_row_parallel_two_ranks(ranks, monkeypatch, fmt):
    """q/k/v by head and an input-sharded row-parallel layer (partial sums add up to the reference)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(2)
    hidden, head, heads, kv = 64, 16, 4, 2
    wq, wk, wv = (torch.randn(n, hidden) * 0.2 for n in (heads * head, kv * head, kv * head))
    ck = {sid: write_layer(fmt, w) for sid, w in zip("qkv", (wq, wk, wv))}
    wo = torch.randn(hidden, 128) * 0.2
    o_tensors, o_ref = write_layer(fmt, wo, seed=7)
    x = torch.randn(2, hidden)
    xo = torch.randn(2, 128)
    row_sum = 0
    for rank in range(2):
        set_tensor_model_parallel(rank, 2)
        qkv = QKVParallelLinear(hidden, head, heads, kv, quant_config=make_config(fmt), prefix="m.qkv_proj")
        for sid, (tensors, _) in ck.items():
            _load(qkv, tensors, sid)
        out = _run(qkv, x)
        q, k, v = out.split([heads * head // 2, kv * head // 2, kv * head // 2], dim=-1)
        for got, sid, rows in ((q, "q", heads * head // 2), (k, "k", kv * head // 2), (v, "v", kv * head // 2)):
            ref = x.double() @ ck[sid][1][rank * rows:(rank + 1) * rows].t()
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item() + 1e-5)
        row = RowParallelLinear(128, hidden, quant_config=make_config(fmt), prefix="m.o_proj")
        _load(row, o_tensors, None)
        row_sum = row_sum + _run(row, xo[:, rank * 64:(rank + 1) * 64])
    ref = xo.double() @ o_ref.t()
    if fmt == "fp8_online":   # each rank quantizes its own shard: per-channel scales of its columns
        ref = sum(xo[:, r * 64:(r + 1) * 64].double() @ write_layer(fmt, wo[:, r * 64:(r + 1) * 64])[1].t()
                  for r in range(2))
    torch.testing.assert_close(row_sum, ref, rtol=0, atol=2e-5 * ref.abs().max().item() + 1e-5)


@pytest.mark.parametrize("fmt", INT4_FORMATS)
def test_int4_layer_batched_half_kernel(ranks, monkeypatch, fmt):
    """Every int4 format's layer in fp16 with a decode batch of rows dispatches to the batched W4A16 kernel
    (act-order included) and matches the checkpoint's float64 weight, as does another W4A16 shape."""
    from aphrodite.kernels.int4_matmul import _candidates_for, _default_config, quant_matmul, w4_supported
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(3)
    k, sizes = 64, [64, 64]
    ws = [torch.randn(n, k) * 0.2 for n in sizes]
    ckpts = [write_layer(fmt, w) for w in ws]
    set_tensor_model_parallel(0, 1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        layer = MergedColumnParallelLinear(k, sizes, quant_config=make_config(fmt),
                                           prefix="model.layers.0.mlp.gate_up_proj")
    finally:
        torch.set_default_dtype(default)
    for i, (tensors, _) in enumerate(ckpts):
        _load(layer, tensors, i)
    x = torch.randn(20, k).half()
    process_weights_after_loading(layer)
    assert w4_supported(x, layer.quant_weight) and _default_config(x.shape[0], x, layer.quant_weight).w4
    ref = x.double() @ torch.cat([w for _, w in ckpts]).t()
    cfg = next(c for c in _candidates_for(x.shape[0], x, layer.quant_weight) if c.w4)
    with torch.no_grad():
        for out in (layer.quant_method.apply(layer, x, layer.bias), quant_matmul(x, layer.quant_weight, config=cfg)):
            torch.testing.assert_close(out.double(), ref, rtol=2**-9, atol=2**-9 * ref.abs().max().item())
