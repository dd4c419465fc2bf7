"""The fused-MoE grouped GEMM (Triton; the interpreter on CPU) against a float64 per-token oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aphrodite.kernels.fused_moe import (
    _align_torch,
    fused_experts,
    fused_experts_ref,
    fused_moe,
    moe_align_block_size,
    select_experts,
)
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


@pytest.mark.parametrize("align", [_align_torch, moe_align_block_size], ids=["torch", "triton"])
def test_align_block_size_groups_pairs_by_expert(align) -> None:
    """Both the tensor-op version and the Triton one (atomics; interpreter on the CPU)."""
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [2, 3]])
    sorted_ids, expert_ids, num_padded = align(ids, 4, num_experts=5)
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


def test_align_many_pairs_matches_torch_version() -> None:
    """More pairs than one histogram step (1,024), an expert with none: the same padded groups and block
    experts as the tensor-op version, each group holding the same pairs (in any order)."""
    ids = torch.randint(0, 6, (700, 4), generator=torch.Generator().manual_seed(1))
    ids[ids == 3] = 4
    got, want = moe_align_block_size(ids, 16, 7), _align_torch(ids, 16, 7)
    assert int(got[2]) == int(want[2])
    total = int(want[2])
    assert torch.equal(got[1].long()[:total // 16], want[1].long()[:total // 16])
    block_experts = want[1].long()[:total // 16]
    for e in block_experts.unique().tolist():
        blocks = (block_experts == e).nonzero().flatten()
        rows = slice(int(blocks[0]) * 16, (int(blocks[-1]) + 1) * 16)
        assert sorted(got[0][rows].tolist()) == sorted(want[0][rows].tolist())
    assert (got[0][total:] == ids.numel()).all()


@pytest.mark.parametrize("t,e,k,h,i", [(1, 8, 2, 64, 32), (7, 4, 2, 32, 48), (37, 16, 4, 64, 32)])
def test_reference_matches_oracle(t, e, k, h, i) -> None:
    x, w13, w2, w, ids = make(t, e, k, h, i, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(fused_experts_ref(x, w13, w2, w, ids).double(), oracle(x, w13, w2, w, ids),
                               rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("t,e,k,h,i", [(1, 8, 2, 64, 32), (5, 4, 2, 32, 48), (70, 16, 4, 64, 32),
                                       (3, 6, 1, 40, 24), (60, 4, 2, 40, 24), (100, 4, 2, 32, 24)])
def test_triton_matches_oracle(device, t, e, k, h, i) -> None:
    """Decode-sized (few pairs: no sort) and prefill-sized (sorted) batches over every row-block size of the
    tile table; experts that get no token; sizes that are not multiples of the tiles."""
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


def routing_oracle(logits, k, renormalize, scoring):
    """float64 scores; the k largest by sorting (lowest index first among equals); optional renormalisation."""
    lg = logits.double()
    scores = lg.softmax(-1) if scoring == "softmax" else lg.sigmoid()
    ids = torch.stack([torch.tensor(sorted(range(lg.shape[1]), key=lambda e: (-float(row[e]), e))[:k])
                       for row in scores])
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


@needs_triton
@pytest.mark.parametrize("t,e,k,renorm,scoring", [(5, 8, 2, True, "softmax"), (3, 60, 6, False, "softmax"),
                                                  (4, 16, 3, True, "sigmoid"), (1, 128, 8, True, "softmax")])
def test_select_experts_kernel_matches_oracle(device, t, e, k, renorm, scoring) -> None:
    """The fused softmax/sigmoid + top-k + renormalise kernel (non-power-of-2 experts and k included)."""
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(e)).bfloat16()
    weights, ids = select_experts(logits.to(device), k, renorm, scoring)
    ref_w, ref_ids = routing_oracle(logits, k, renorm, scoring)
    assert weights.dtype == torch.float32 and ids.shape == (t, k)
    assert torch.equal(ids.cpu().long(), ref_ids)
    torch.testing.assert_close(weights.cpu().double(), ref_w, rtol=1e-5, atol=1e-6)
    w16, _ = select_experts(logits.to(device), k, renorm, scoring, torch.bfloat16)
    assert w16.dtype == torch.bfloat16
    # one bf16 step: Triton's interpreter truncates to bf16 where the GPU rounds to nearest
    torch.testing.assert_close(w16.cpu().double(), ref_w, rtol=2 ** -7, atol=0)


@needs_triton
@pytest.mark.parametrize("t,e,k,h,i,act", [(1, 32, 8, 48, 40, "silu"), (2, 24, 3, 64, 24, "gelu"),
                                           (4, 64, 4, 300, 20, "silu")])
def test_small_batch_path_matches_oracle(device, t, e, k, h, i, act) -> None:
    """Few pairs (2 * T * k <= E): the GEMV-shaped path, gate/up + activation fused, the k experts of a
    token weighted and summed in one program; k not a power of 2, sizes off the tiles, int32 ids."""
    assert 2 * t * k <= e
    x, w13, w2, w, ids = make(t, e, k, h, i, torch.float32, device, seed=10 + t)
    out = fused_experts(x, w13, w2, w, ids.int(), activation=act)
    ref = oracle(*(a.cpu() for a in (x, w13, w2, w, ids)), activation=act)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@needs_triton
def test_small_batch_path_bf16(device) -> None:
    x, w13, w2, w, ids = make(1, 32, 8, 64, 32, torch.bfloat16, device, seed=5)
    out = fused_experts(x, w13, w2, w, ids)
    ref = oracle(*(a.cpu() for a in (x, w13, w2, w, ids)))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)


@needs_triton
@pytest.mark.parametrize("t,e,k,renorm,scoring,act", [(1, 32, 8, True, "softmax", "silu"),
                                                      (2, 24, 3, False, "sigmoid", "gelu"),
                                                      (9, 6, 2, True, "softmax", "silu")])
def test_fused_moe_routes_and_runs_experts(device, t, e, k, renorm, scoring, act) -> None:
    """Router logits in, layer output out: routing inside the first experts kernel at few pairs (the first
    two cases), the routing kernel then the sorted grouped GEMM beyond (the last)."""
    x, w13, w2, _, _ = make(t, e, k, 48, 24, torch.float32, device, seed=20 + t)
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t))
    out = fused_moe(x, logits.to(device), w13, w2, k, renorm, scoring, act)
    w, ids = routing_oracle(logits, k, renorm, scoring)
    ref = oracle(x.cpu(), w13.cpu(), w2.cpu(), w, ids, activation=act)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("elem_size,limit", [(2, 211 * 1024), (4, 211 * 1024), (2, 83 * 1024), (4, 83 * 1024)])
def test_tile_table_fits_shared_memory(elem_size, limit) -> None:
    """Every tile of the table, shrunk for fp32 or a smaller GPU, keeps its pipelined tiles within the limit."""
    from aphrodite.kernels.fused_moe import _fit_smem, _tiles
    for tokens in (1, 64, 160, 320, 640, 4096):
        bm, bn, bk, _, stages = _fit_smem(_tiles(tokens, 8, 128), elem_size, limit)
        assert (bm * bk + bk * bn) * elem_size * stages <= limit and min(bm, bn, bk) >= 16


@needs_triton
@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("fused", [True, False])
def test_sorted_path_activation_in_the_gemm_or_not(device, monkeypatch, act, fused) -> None:
    """The first grouped GEMM computing act(gate) * up in its epilogue (two accumulators), or writing
    gate/up for a separate activation."""
    import aphrodite.kernels.fused_moe as fm
    monkeypatch.setattr(fm, "FUSE_ACT_IN_GEMM", fused)
    x, w13, w2, w, ids = make(40, 4, 2, 48, 40, torch.float32, device, seed=7)
    out = fused_experts(x, w13, w2, w, ids, activation=act)
    ref = oracle(*(a.cpu() for a in (x, w13, w2, w, ids)), activation=act)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)
