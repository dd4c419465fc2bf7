"""LoRA shrink/expand: the Triton kernels against a float64 recomputation, per token's own slot."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.lora import (
    FUSED_BLOCK_M,
    fused_num_tiles,
    lora_expand,
    lora_expand_ref,
    lora_expand_tiles,
    lora_fused,
    lora_shrink,
    lora_shrink_ref,
    lora_shrink_tiles,
    lora_tiles_host,
    lora_token_metadata,
    lora_token_metadata_host,
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
@pytest.mark.parametrize("path", ["fused", "tiles"])
def test_tile_kernels_match_float64(device, dtype, tol, tokens, sizes, k, path):
    """Small batches: fused q/k/v (or gate/up) with a block-diagonal B, tiles of one slot's tokens (21
    tokens: a slot spans two tiles), base-model tokens left alone; one fused launch, or a K-split
    partial shrink (k=300: three chunks, the last one short) and an expand that sums the partials."""
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
    order, counts, starts = lora_token_metadata_host(slots.numpy(), s)
    grid = fused_num_tiles(tokens, s) + 1     # one spare program: empty tiles must exit
    tiles = lora_tiles_host(counts, starts, grid)
    assert tiles[2].sum() == (slots >= 0).sum() and tiles[2].max() <= FUSED_BLOCK_M
    y0 = torch.randn(tokens, n, dtype=dtype, device=device)
    order_d, tiles_d = torch.from_numpy(order).to(device), torch.from_numpy(tiles).to(device)
    if path == "fused":
        y = lora_fused(x, a, b, order_d, tiles_d, y0.clone(), sizes, rank)
    else:
        part = torch.full((4, grid * FUSED_BLOCK_M, p * rank), float("nan"), device=device)   # only written rows read
        part = lora_shrink_tiles(x, a, order_d, tiles_d, part, split=3, block_k=64)
        assert part.shape[0] == (1 if k < 128 else 3)
        y = lora_expand_tiles(part, b, order_d, tiles_d, y0.clone(), sizes, rank)
    _, exp_y = _expected(x.cpu(), a.cpu(), b.cpu(), slots, y0.cpu())
    torch.testing.assert_close(y.cpu().double(), exp_y, rtol=tol, atol=tol * 8)
