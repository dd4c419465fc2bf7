"""Paged attention: Triton kernels vs the PyTorch references vs a dense float64 oracle.

Every batch is built from dense per-sequence K/V (the truth), then paged into a NaN-poisoned cache
through shuffled block tables whose unused entries point at poisoned blocks, so reading any slot
outside a sequence, or skipping a write, shows up as NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from aphrodite.kernels.paged_attention import (
    TritonAttentionBackend,
    choose_num_splits,
    paged_attention,
    paged_attention_ref,
    reshape_and_cache,
    reshape_and_cache_ref,
)
from aphrodite.kernels.triton_utils import HAS_TRITON
from aphrodite.modeling.layers.attention import AttentionMetadata, TorchAttentionBackend

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


@dataclass
class Case:
    q: torch.Tensor            # [T, Hq, D]
    k_new: torch.Tensor        # [T, Hkv, D]
    v_new: torch.Tensor
    k_cache: torch.Tensor      # prefix written, this step's tokens not yet
    v_cache: torch.Tensor
    meta: AttentionMetadata
    keys: list[torch.Tensor]   # dense float64 [seq_len, Hkv, D] per sequence
    vals: list[torch.Tensor]
    q_lens: list[int]
    num_real_tokens: int


def make_case(q_lens: list[int], ctx_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
              page: int, dtype: torch.dtype, device: torch.device, num_decodes: int | None = None,
              pad_tokens: int = 0, seed: int = 0, min_blocks: int = 0, table_width: int = 0,
              poison: float = float("nan")) -> Case:
    """Sequence i has ``ctx_lens[i]`` cached tokens and ``q_lens[i]`` new ones; ``pad_tokens`` extra
    query tokens at the end belong to no sequence (slot -1), as under CUDA-graph padding."""
    gen = torch.Generator().manual_seed(seed)
    b = len(q_lens)
    hq = num_kv_heads * group
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    nblk = [math.ceil(s / page) for s in seq_lens]
    max_blocks = max(max(nblk) + 2, table_width)
    num_blocks = max(sum(nblk) + 4, min_blocks)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    used, tables = 0, []
    poison_blocks = perm[sum(nblk):]
    for n in nblk:
        row = perm[used:used + n]
        used += n
        row += [poison_blocks[j % len(poison_blocks)] for j in range(max_blocks - n)]
        tables.append(row)
    block_tables = torch.tensor(tables, dtype=torch.int32)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    keys = [rnd(s, num_kv_heads, head_dim) for s in seq_lens]
    vals = [rnd(s, num_kv_heads, head_dim) for s in seq_lens]
    # Round the truth to the working dtype so the oracle sees exactly what the kernels see.
    keys = [k.to(dtype).double() for k in keys]
    vals = [v.to(dtype).double() for v in vals]
    k_cache = torch.full((num_blocks, page, num_kv_heads, head_dim), poison, dtype=dtype)
    v_cache = torch.full_like(k_cache, poison)
    slots: list[int] = []
    k_new, v_new = [], []
    for i in range(b):
        for pos in range(seq_lens[i]):
            blk, off = tables[i][pos // page], pos % page
            if pos < ctx_lens[i]:
                k_cache[blk, off] = keys[i][pos].to(dtype)
                v_cache[blk, off] = vals[i][pos].to(dtype)
            else:
                slots.append(blk * page + off)
        k_new.append(keys[i][ctx_lens[i]:])
        v_new.append(vals[i][ctx_lens[i]:])
    t_real = sum(q_lens)
    kn = torch.cat(k_new + [rnd(pad_tokens, num_kv_heads, head_dim)]).to(dtype)
    vn = torch.cat(v_new + [rnd(pad_tokens, num_kv_heads, head_dim)]).to(dtype)
    q = rnd(t_real + pad_tokens, hq, head_dim).to(dtype)
    slots += [-1] * pad_tokens
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    if num_decodes is None:
        num_decodes = 0
        while num_decodes < b and q_lens[num_decodes] == 1:
            num_decodes += 1
    dec_lens = seq_lens[:num_decodes]
    meta = AttentionMetadata(
        num_decodes=num_decodes, query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        max_decode_seq_len=max(dec_lens) if dec_lens else 0,
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    return Case(q.to(device), kn.to(device), vn.to(device), k_cache.to(device), v_cache.to(device), meta,
                keys, vals, list(q_lens), t_real)


def dense_attention(case: Case, scale: float, window: int = 0, cap: float = 0.0) -> torch.Tensor:
    """Naive float64 causal GQA attention over the dense per-sequence K/V: [T_real, Hq, D] (keys
    ``pos - window < j <= pos`` only, scores soft-capped by ``cap``, when given)."""
    hq = case.q.shape[1]
    outs = []
    start = 0
    for keys, vals, q_len in zip(case.keys, case.vals, case.q_lens):
        seq_len = keys.shape[0]
        q = case.q[start:start + q_len].double().cpu()
        start += q_len
        group = hq // keys.shape[1]
        k = keys.repeat_interleave(group, dim=1)
        v = vals.repeat_interleave(group, dim=1)
        out = torch.empty(q_len, hq, keys.shape[2], dtype=torch.float64)
        for j in range(q_len):
            pos = seq_len - q_len + j
            lo = max(0, pos + 1 - window) if window else 0
            s = torch.einsum("hd,khd->hk", q[j], k[lo:pos + 1]) * scale
            if cap:
                s = torch.tanh(s / cap) * cap
            p = torch.softmax(s, dim=-1)
            out[j] = torch.einsum("hk,khd->hd", p, v[lo:pos + 1])
        outs.append(out)
    return torch.cat(outs)


def run_triton(case: Case, scale: float, num_splits: int | None = None, window: int | None = None,
               cap: float | None = None, fused_reduce: bool = True) -> torch.Tensor:
    """reshape_and_cache + paged_attention into a NaN-poisoned output (short decode contexts split too)."""
    m = case.meta
    reshape_and_cache(case.k_new, case.v_new, case.k_cache, case.v_cache, m.slot_mapping)
    out = torch.full_like(case.q, float("nan"))
    paged_attention(case.q, case.k_cache, case.v_cache, out, m.query_start_loc, m.seq_lens, m.block_tables,
                    scale, m.max_query_len, m.max_seq_len, num_decodes=m.num_decodes,
                    max_decode_seq_len=m.max_decode_seq_len, num_splits=num_splits, solo_tiles=0,
                    sliding_window=window, logits_soft_cap=cap, fused_reduce=fused_reduce)
    return out


def check(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> None:
    out = out.double().cpu()
    ref = ref.double().cpu()
    assert not torch.isnan(out).any(), "an output element was not written (or read poison)"
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


TOL = {torch.float32: (1e-4, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
MIXED = dict(q_lens=[1, 1, 1, 9, 11], ctx_lens=[15, 40, 3, 0, 21])


# ---------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("page", [16, 32])
def test_reshape_and_cache(device: torch.device, page: int) -> None:
    case = make_case([1, 5, 7], [4, 0, 30], num_kv_heads=2, group=1, head_dim=64, page=page,
                     dtype=torch.float32, device=device, pad_tokens=2)
    k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
    reshape_and_cache_ref(case.k_new, case.v_new, k_ref, v_ref, case.meta.slot_mapping)
    reshape_and_cache(case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta.slot_mapping)
    torch.testing.assert_close(case.k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case.v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    # Every sequence token is now in the cache: no NaN left inside any sequence's blocks.
    page_size = case.k_cache.shape[1]
    for i, s in enumerate(case.meta.seq_lens_cpu):
        for pos in range(s):
            blk = int(case.meta.block_tables[i, pos // page_size])
            assert not torch.isnan(case.k_cache[blk, pos % page_size]).any()


@needs_triton
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_mixed_batch_vs_reference(device: torch.device, group: int, head_dim: int, page: int) -> None:
    """Decodes + a fresh prefill + a chunk after a cached prefix, in one batch, with padding tokens."""
    case = make_case(**MIXED, num_kv_heads=2, group=group, head_dim=head_dim, page=page,
                     dtype=torch.float32, device=device, pad_tokens=3, seed=group * 1000 + head_dim + page)
    scale = head_dim ** -0.5
    out = run_triton(case, scale)[:case.num_real_tokens]
    ref = torch.full_like(case.q, float("nan"))
    m = case.meta
    paged_attention_ref(case.q, case.k_cache, case.v_cache, ref, m.query_start_loc, m.seq_lens,
                        m.block_tables, scale)
    rtol, atol = TOL[torch.float32]
    check(out, ref[:case.num_real_tokens], rtol, atol)
    check(out, dense_attention(case, scale), rtol, atol)


@needs_triton
@pytest.mark.parametrize("ctx_lens", [[0, 0], [16, 35]], ids=["no_prefix", "cached_prefix"])
def test_prefill(device: torch.device, ctx_lens: list[int]) -> None:
    """Prefill only; the long chunk spans several query tiles and key tiles."""
    case = make_case([7, 70], ctx_lens, num_kv_heads=1, group=2, head_dim=64, page=16,
                     dtype=torch.float32, device=device)
    out = run_triton(case, 0.125)
    check(out, dense_attention(case, 0.125), *TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("num_splits,fused", [(1, True), (2, True), (3, True), (8, True), (3, False), (5, False)])
def test_decode_split_kv(device: torch.device, num_splits: int, fused: bool) -> None:
    """Flash-decoding: splits beyond the context (empty splits) must contribute nothing, whether the last
    split merges the partials in the attention launch or a separate reduce launch does (the split factor
    is a run-time argument: 3 and 5 share compiled kernels with 4 and 8)."""
    ctx = [150, 6, 63, 200]
    case = make_case([1] * 4, ctx, num_kv_heads=2, group=4, head_dim=64, page=16,
                     dtype=torch.float32, device=device)
    out = run_triton(case, 0.125, num_splits=num_splits, fused_reduce=fused)
    check(out, dense_attention(case, 0.125), *TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device: torch.device, dtype: torch.dtype) -> None:
    case = make_case(**MIXED, num_kv_heads=2, group=4, head_dim=128, page=16, dtype=dtype, device=device)
    out = run_triton(case, 128 ** -0.5)
    check(out[:case.num_real_tokens], dense_attention(case, 128 ** -0.5), *TOL[dtype])


@needs_triton
@pytest.mark.parametrize(("num_splits", "chunk"), [(2, 20), (1, 70)])
def test_head_dim_256(device: torch.device, num_splits: int, chunk: int) -> None:
    """Decode plus a chunk after a prefix at head_dim 256: split decodes take 32-key tiles, unsplit ones 64;
    a 70-token chunk of 2 query heads per KV head takes the 128-row prefill tile, a 20-token one 64 rows."""
    case = make_case([1, 1, chunk], [70, 20, 37], num_kv_heads=1, group=2, head_dim=256, page=32,
                     dtype=torch.float32, device=device)
    out = run_triton(case, 0.0625, num_splits=num_splits)
    check(out, dense_attention(case, 0.0625), *TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("group", [1, 4])
def test_backend_matches_torch_backend(device: torch.device, group: int) -> None:
    """TritonAttentionBackend.forward == TorchAttentionBackend.forward, output and cache contents.

    The cache is poisoned with a large finite value: the torch decode path reads (and multiplies by
    zero) slots past each sequence's end, so NaN there would poison its output."""
    case = make_case(**MIXED, num_kv_heads=2, group=group, head_dim=64, page=16, dtype=torch.float32,
                     device=device, pad_tokens=2, poison=1.0e4)
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    ref = TorchAttentionBackend.forward(case.q, case.k_new, case.v_new, kc, vc, case.meta, 0.125)
    out = TritonAttentionBackend.forward(case.q, case.k_new, case.v_new, case.k_cache, case.v_cache,
                                         case.meta, 0.125)
    n = case.num_real_tokens
    check(out[:n], ref[:n], *TOL[torch.float32])
    torch.testing.assert_close(case.k_cache, kc, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case.v_cache, vc, rtol=0, atol=0, equal_nan=True)


@needs_triton
@pytest.mark.parametrize("window,cap,splits", [(20, None, 1), (37, None, 3), (None, 5.0, 2), (16, 2.0, 1)])
def test_sliding_window_and_soft_cap(device: torch.device, window: int | None, cap: float | None,
                                     splits: int) -> None:
    """Windows that start mid-tile and mid-block, in decode (split too) and in chunks longer than the
    window; soft-capped scores. Blocks wholly before every window are poisoned (as when freed and reused)."""
    case = make_case(q_lens=[1, 1, 9, 40], ctx_lens=[60, 11, 50, 25], num_kv_heads=2, group=2, head_dim=64,
                     page=16, dtype=torch.float32, device=device, seed=7)
    case.q.mul_(4)   # large scores, so the cap changes the result
    if window:
        m = case.meta
        for i, ctx in enumerate([60, 11, 50, 25]):
            for blk in range(max(0, ctx - window + 1) // 16):
                b = int(m.block_tables[i, blk])
                case.k_cache[b].fill_(float("nan"))
                case.v_cache[b].fill_(float("nan"))
    ref = dense_attention(case, 0.125, window or 0, cap or 0.0)
    out = run_triton(case, 0.125, num_splits=splits, window=window, cap=cap)
    check(out, ref, *TOL[torch.float32])
    kc, vc = case.k_cache.clone(), case.v_cache.clone()   # already holds this step's k/v
    torch_out = TorchAttentionBackend.forward(case.q.cpu(), case.k_new.cpu(), case.v_new.cpu(), kc.cpu(), vc.cpu(),
                                              _cpu_meta(case.meta), 0.125, sliding_window=window,
                                              logits_soft_cap=cap)
    check(torch_out, ref, *TOL[torch.float32])
    assert not torch.allclose(ref, dense_attention(case, 0.125), atol=1e-3)


def _cpu_meta(m: AttentionMetadata) -> AttentionMetadata:
    from dataclasses import replace
    return replace(m, query_start_loc=m.query_start_loc.cpu(), seq_lens=m.seq_lens.cpu(),
                   block_tables=m.block_tables.cpu(), slot_mapping=m.slot_mapping.cpu())


@pytest.mark.parametrize("group", [1, 2, 4])
def test_torch_backend_vs_dense_float64(group: int) -> None:
    """The reference backend itself against an independent naive dense attention."""
    case = make_case(**MIXED, num_kv_heads=2, group=group, head_dim=64, page=16, dtype=torch.float32,
                     device=torch.device("cpu"), pad_tokens=1, poison=1.0e4)
    out = TorchAttentionBackend.forward(case.q, case.k_new, case.v_new, case.k_cache, case.v_cache,
                                        case.meta, 0.125)
    check(out[:case.num_real_tokens], dense_attention(case, 0.125), *TOL[torch.float32])


def test_choose_num_splits() -> None:
    cpu = torch.device("cpu")
    assert choose_num_splits(1, 8, 8192, cpu) > 1          # one long decode: split
    assert choose_num_splits(256, 8, 1024, cpu) == 1       # big batch fills the GPU
    assert choose_num_splits(1, 8, 512, cpu) == 1          # short context: not worth a reduce
    assert choose_num_splits(0, 8, 8192, cpu) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay() -> None:
    """Capture one decode step (split-KV chosen), replay it on another batch's data copied into the
    captured buffers: no host syncs in the path, and the replay reads the new lengths and tables."""
    dev = torch.device("cuda")
    kwargs = dict(num_kv_heads=2, group=4, head_dim=128, page=16, dtype=torch.bfloat16, device=dev,
                  min_blocks=600, table_width=260)
    cap = make_case([1] * 4, [1500, 3000, 20, 4000], seed=1, **kwargs)
    new = make_case([1] * 4, [900, 3100, 77, 2500], seed=2, **kwargs)
    m = cap.meta
    assert choose_num_splits(m.num_decodes, 2, m.max_decode_seq_len, dev) > 1
    TritonAttentionBackend.forward(cap.q, cap.k_new, cap.v_new, cap.k_cache, cap.v_cache, m, 0.1)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = TritonAttentionBackend.forward(cap.q, cap.k_new, cap.v_new, cap.k_cache, cap.v_cache, m, 0.1)
    for dst, src in [(cap.q, new.q), (cap.k_new, new.k_new), (cap.v_new, new.v_new),
                     (cap.k_cache, new.k_cache), (cap.v_cache, new.v_cache),
                     (m.seq_lens, new.meta.seq_lens), (m.slot_mapping, new.meta.slot_mapping),
                     (m.block_tables, new.meta.block_tables)]:
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    check(out, dense_attention(new, 0.1), *TOL[torch.bfloat16])


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_append_with_window_and_soft_cap(device: torch.device, num_splits: int) -> None:
    """The one-launch decode (rotate q/k, append k/v, attend) with a window that starts mid-block and a
    soft cap, against the reference doing the same steps one by one."""
    from aphrodite.kernels.paged_attention import DecodeAppend
    from tests.kernels.test_kernel_rope_cache import cos_sin, decode_batch
    bt = decode_batch([150, 6, 63, 200], hkv=2, group=4, d=64, page=16, dtype=torch.float32, device=device)
    append = DecodeAppend(bt["pos"], cos_sin(64, device, torch.float32), bt["k"], bt["v"], bt["slots"])
    args = (bt["qsl"], bt["seq_lens"], bt["tables"], 0.125, 1, bt["max_len"])
    kw = dict(sliding_window=37, logits_soft_cap=4.0)
    kc_ref, vc_ref = bt["kc"].clone(), bt["vc"].clone()
    ref = torch.zeros(bt["q"].shape, dtype=torch.float32, device=device)
    paged_attention_ref(bt["q"] * 4, kc_ref, vc_ref, ref, *args, append=append, **kw)
    out = torch.full(bt["q"].shape, float("nan"), device=device)
    paged_attention(bt["q"] * 4, bt["kc"], bt["vc"], out, *args, num_decodes=4, max_decode_seq_len=bt["max_len"],
                    num_splits=num_splits, append=append, solo_tiles=0, **kw)
    check(out, ref, *TOL[torch.float32])
    plain = torch.zeros_like(ref)
    paged_attention_ref(bt["q"] * 4, kc_ref.clone(), vc_ref.clone(), plain, *args, append=append)
    assert not torch.allclose(plain, ref, atol=1e-3)   # the window and the cap changed the result
