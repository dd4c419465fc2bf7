"""The fused-MoE grouped GEMM (Triton; the interpreter on CPU) against a float64 per-token oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aphrodite.kernels.fused_moe import fused_experts, fused_experts_ref, moe_align_block_size
from aphrodite.kernels.triton_utils import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def oracle(x, w13, w2, weights, ids, activation="silu"):
    """Token by token, expert by expert, in float64: the definition of the MoE output."""
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            gate = F.silu(h[:inter]) if activation == "silu" else F.gelu(h[:inter], approximate="tanh")
            out[t] += weights[t, j] * (w2[e] @ (gate * h[inter:]))
    return out


def make(t, e, k, h, i, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype)
    logits = torch.randn(t, e, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), k, dim=-1)
    return [a.to(device) for a in (x, w13, w2, weights.to(dtype), ids)]


def test_align_block_size_groups_pairs_by_expert() -> None:
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [2, 3]])
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, 4, num_experts=5)
    n = ids.numel()
    total = int(num_padded)
    assert total == 4 * 4   # experts 0, 1, 2, 3 each padded to one block of 4 (3 has 4 pairs)
    flat = ids.reshape(-1)
    seen = []
    for blk in range(total // 4):
        rows = sorted_ids[blk * 4:(blk + 1) * 4].tolist()
        valid = [r for r in rows if r < n]
        assert all(int(flat[r]) == int(expert_ids[blk]) for r in valid)
        seen += valid
    assert sorted(seen) == list(range(n))
    assert (sorted_ids[total:] == n).all()


@pytest.mark.parametrize("t,e,k,h,i", [(1, 8, 2, 64, 32), (7, 4, 2, 32, 48), (37, 16, 4, 64, 32)])
def test_reference_matches_oracle(t, e, k, h, i) -> None:
    x, w13, w2, w, ids = make(t, e, k, h, i, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(fused_experts_ref(x, w13, w2, w, ids).double(), oracle(x, w13, w2, w, ids),
                               rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("t,e,k,h,i", [(1, 8, 2, 64, 32), (5, 4, 2, 32, 48), (70, 16, 4, 64, 32),
                                       (3, 6, 1, 40, 24)])
def test_triton_matches_oracle(device, t, e, k, h, i) -> None:
    """Decode-sized (few pairs: one row block per pair, no sort) and prefill-sized (sorted) batches; experts
    that get no token;
    sizes that are not multiples of the tiles."""
    x, w13, w2, w, ids = make(t, e, k, h, i, torch.float32, device, seed=t)
    out = fused_experts(x, w13, w2, w, ids)
    torch.testing.assert_close(out.double().cpu(), oracle(*(a.cpu() for a in (x, w13, w2, w, ids))),
                               rtol=1e-4, atol=1e-4)


@needs_triton
def test_triton_bf16_and_gelu(device) -> None:
    x, w13, w2, w, ids = make(9, 4, 2, 64, 32, torch.bfloat16, device, seed=3)
    out = fused_experts(x, w13, w2, w, ids, activation="gelu")
    ref = oracle(*(a.cpu() for a in (x, w13, w2, w, ids)), activation="gelu")
    torch.testing.assert_close(out.double().cpu(), ref, rtol=3e-2, atol=3e-2)
