"""oneDNN pre-packed CPU linear layers against a float64 reference, and the model-level packing."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.cpu import packed_linear
from aphrodite.modeling.layers.linear import ReplicatedLinear, dense, pack_cpu_weight

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this PyTorch build has no oneDNN packing")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_float64(dtype, rows, bias):
    if not packed_linear.available(dtype):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU")
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(200, 96, generator=g) * 0.1).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 96, generator=g).to(dtype)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    got = packed_linear.linear(x, packed_linear.pack(w), b)
    assert got.dtype == dtype and got.shape == (rows, 200)
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    # through the layer dispatch, with any leading dims
    got3 = dense(x.view(1, rows, 96), w, b, packed_linear.pack(w))
    torch.testing.assert_close(got3.view(rows, 200).double(), ref, **TOL[dtype])


def test_packed_weight_is_a_copy_and_layer_output_unchanged():
    torch.manual_seed(0)
    layer = ReplicatedLinear(48, 80, bias=True)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(17, 48)
    before = layer(x)
    plain = layer.weight.detach().clone()
    pack_cpu_weight(layer)
    assert layer.packed_weight is not None
    assert torch.equal(layer.weight, plain)      # the plain weight still serves the GEMV and lookups
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x[:1]), before[:1], atol=1e-5, rtol=1e-5)   # the GEMV rows


def test_packing_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("APHRODITE_CPU_PACKED_WEIGHTS", "0")
    packed_linear.available.cache_clear()
    try:
        assert not packed_linear.available() and not packed_linear.available(torch.bfloat16)
        layer = ReplicatedLinear(8, 8)
        pack_cpu_weight(layer)
        assert layer.packed_weight is None
    finally:
        monkeypatch.delenv("APHRODITE_CPU_PACKED_WEIGHTS")
        packed_linear.available.cache_clear()
