"""The LoRA layers' Triton path (run by the CPU interpreter) against a float64 recomputation.

``LoRAState.fill``/``prepare`` give small steps tiles (the base GEMM with every slot's A rows
appended, or a K-split partial shrink, then an expand) and larger ones shrink + expand; each must give every token
``base(x) + B_p A_p x`` of its own adapter, per fused projection ``p`` (q/k/v, gate/up), and leave
base-model tokens at ``base(x)``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aphrodite.kernels.lora import TILE_MAX_TOKENS
from aphrodite.lora.layers import LoRALinear, LoRAState
from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

SLOTS, MAX_RANK = 3, 8


@pytest.mark.parametrize("tokens,append", [(1, True), (7, True), (7, False), (TILE_MAX_TOKENS + 9, True)])
def test_lora_linear_triton_matches_float64(monkeypatch: pytest.MonkeyPatch, tokens: int, append: bool) -> None:
    """Small steps: A rows appended to the base weight (one GEMM, one expand) or, where they cannot
    be (``append=False``), a partial shrink and an expand; bigger steps: shrink + expand."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not append:
        monkeypatch.setattr(LoRALinear, "_can_append_a", lambda self, dtype: False)
    gen = torch.Generator().manual_seed(tokens)
    state = LoRAState(SLOTS, 64, torch.device("cpu"))
    layers = {
        "qkv": (QKVParallelLinear(32, 8, 4, 2), [32, 16, 16]),
        "gate_up": (MergedColumnParallelLinear(32, [24, 24]), [24, 24]),
        "down": (RowParallelLinear(24, 32), [32]),
    }
    slots = np.array([(i % (SLOTS + 1)) - 1 for i in range(tokens)], dtype=np.int64)
    slots[0] = 2
    for name, (base, sizes) in layers.items():
        with torch.no_grad():
            base.weight.copy_(torch.randn(base.weight.shape, generator=gen) / 4)
        weight = base.weight.detach().clone()
        layer = LoRALinear(base, state, SLOTS, MAX_RANK, torch.float32)
        assert (layer.weight_cat is not None) == append
        torch.testing.assert_close(base.weight, weight, atol=0, rtol=0)     # the base weight is unchanged
        adapters = {}
        for slot, rank in ((0, 4), (2, 8)):     # slot 1 stays empty (zeros): its tokens get base(x)
            ab = [(torch.randn(rank, base.in_features, generator=gen) / 4, torch.randn(size, rank, generator=gen) / 4)
                  for size in sizes]
            layer.set_slot(slot, ab)
            adapters[slot] = ab
        x = torch.randn(tokens, base.in_features, generator=gen)
        state.active = True
        state.fill(slots)
        state.prepare(tokens)
        assert (state.step_tiles is not None) == (tokens <= TILE_MAX_TOKENS)
        got = layer(x)
        expected = x.double() @ weight.double().t()
        for t, slot in enumerate(slots.tolist()):
            if slot in adapters:
                expected[t] += torch.cat([b.double() @ (a.double() @ x[t].double()) for a, b in adapters[slot]])
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4, msg=name)
