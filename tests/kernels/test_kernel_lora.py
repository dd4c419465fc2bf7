"""LoRA shrink/expand: the Triton kernels against a float64 recomputation, per token's own slot."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.lora import (
    TILE_M,
    lora_expand,
    lora_expand_ref,
    lora_expand_tiles,
    lora_expand_tokens,
    lora_shrink,
    lora_shrink_ref,
    lora_shrink_tiles,
    lora_tiles_host,
    lora_token_metadata,
    lora_token_metadata_host,
    num_tiles_bound,
    partials_buffer,
)


def _expected(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, y: torch.Tensor):
    buf = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    out = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            buf[t] = a[s].double() @ x[t].double()
            out[t] += b[s].double() @ buf[t]
    return buf, out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tokens,k", [(5, 40), (70, 40), (6, 520)])   # 520: split-K with atomic adds
def test_shrink_expand_match_float64(device, dtype, tol, tokens, k):
    s, r, n = 3, 12, 24
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    a = torch.randn(s, r, k, dtype=dtype, device=device) / 4
    b_store = torch.randn(n, s, r, dtype=dtype, device=device) / 4      # the CPU layer's [N, S, R] storage
    b = b_store.permute(1, 0, 2)
    slots = torch.randint(-1, s, (tokens,), device=device)
    y0 = torch.randn(tokens, n, dtype=dtype, device=device)
    meta = lora_token_metadata(slots, s)
    buf = lora_shrink(x, a, meta)
    y = lora_expand(buf, b, meta, y0.clone())
    exp_buf, exp_y = _expected(x.cpu(), a.cpu(), b.cpu(), slots.cpu(), y0.cpu())
    used = slots.cpu() >= 0
    torch.testing.assert_close(buf.cpu().double()[used], exp_buf[used], rtol=tol, atol=tol * 4)
    torch.testing.assert_close(y.cpu().double(), exp_y, rtol=tol, atol=tol * 8)
    # The reference (the CPU path) agrees too.
    ref_buf = lora_shrink_ref(x.cpu(), a.cpu(), slots.cpu())
    torch.testing.assert_close(ref_buf.double(), exp_buf, rtol=tol, atol=tol * 4)
    ref_y = lora_expand_ref(ref_buf, b.cpu(), slots.cpu(), y0.cpu().clone())
    torch.testing.assert_close(ref_y.double(), exp_y, rtol=tol, atol=tol * 8)


def test_metadata_groups_tokens_by_slot():
    slots = torch.tensor([2, -1, 0, 2, 0, -1, 1])
    _, order, counts, starts = lora_token_metadata(slots, 3)
    assert counts.tolist() == [2, 2, 1, 2]
    assert starts.tolist() == [0, 2, 4, 5]
    assert order.tolist() == [1, 5, 2, 4, 6, 0, 3]
    host = lora_token_metadata_host(slots.numpy(), 3)     # the runner's path gives the same
    assert [x.tolist() for x in host] == [order.tolist(), counts.tolist(), starts.tolist()]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tokens,sizes,k", [(1, [48], 40), (5, [32, 16, 16], 300), (21, [40, 24], 40)])
@pytest.mark.parametrize("source", ["partials", "tokens"])
def test_tile_kernels_match_float64(device, dtype, tol, tokens, sizes, k, source):
    """Small batches: fused q/k/v (or gate/up) with a block-diagonal B, tiles of one slot's tokens (21
    tokens: a slot spans two tiles), base-model tokens left alone; the expand sums a K-split partial
    shrink (k=300: three chunks, the last one short) or reads token-major shrink values of every slot
    (a GEMM's extra columns)."""
    s, rank = 3, 8
    p, n = len(sizes), sum(sizes)
    x = torch.randn(tokens, k, dtype=dtype, device=device)
    a = (torch.randn(s, p * rank, k) / 4).to(dtype).to(device)
    b = torch.zeros(s, n, p * rank)
    row = 0
    for i, size in enumerate(sizes):     # projection i: its output rows use its own rank block only
        b[:, row:row + size, i * rank:(i + 1) * rank] = torch.randn(s, size, rank) / 4
        row += size
    b = b.to(dtype).to(device)
    slots = torch.randint(-1, s, (tokens,))
    slots[0] = 1
    grid = num_tiles_bound(tokens, s) + 1     # one spare program: empty tiles must exit
    tiles = lora_tiles_host(slots.numpy(), s, grid)
    assert tiles[:, 1].sum() == (slots >= 0).sum() and tiles[:, 1].max() <= TILE_M
    for slot, count, *rows in tiles.tolist():   # each tile: tokens of its slot only
        assert all(slots[r] == slot for r in rows[:count])
    y0 = torch.randn(tokens, n, dtype=dtype, device=device)
    tiles_d = torch.from_numpy(tiles).to(device)
    if source == "partials":
        part = partials_buffer(grid, p * rank, device)
        part = lora_shrink_tiles(x, a, tiles_d, part, split=3, block_k=64)
        assert part.shape[0] == (1 if k < 128 else 3)
        y = lora_expand_tiles(part, b, tiles_d, y0.clone(), sizes, rank)
    else:
        shrunk = (x.double() @ a.reshape(s * p * rank, k).double().t()).to(dtype)
        wide = torch.zeros(tokens, n + shrunk.shape[1] + 5, dtype=dtype, device=device)   # a row-strided view
        wide[:, n:n + shrunk.shape[1]] = shrunk
        y = lora_expand_tokens(wide[:, n:n + shrunk.shape[1]], b, tiles_d, y0.clone(), sizes, rank)
    _, exp_y = _expected(x.cpu(), a.cpu(), b.cpu(), slots, y0.cpu())
    torch.testing.assert_close(y.cpu().double(), exp_y, rtol=tol, atol=tol * 8)
