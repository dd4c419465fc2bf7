"""Rotary + KV-cache write fused: the standalone launch, the decode attention launch that does both
itself (``DecodeAppend``), the in-kernel split-KV reduce, and the backend entry point, each against
the PyTorch references."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.paged_attention import DecodeAppend, TritonAttentionBackend, paged_attention, paged_attention_ref
from aphrodite.kernels.rope_cache import rope_and_cache, rope_and_cache_ref
from aphrodite.kernels.rotary import build_cos_sin_cache, rotary_embedding_ref
from aphrodite.kernels.triton_utils import HAS_TRITON
from aphrodite.modeling.layers.attention import AttentionMetadata, TorchAttentionBackend

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TOL = {torch.float32: (1e-4, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def cos_sin(rot: int, device: torch.device, dtype: torch.dtype, max_pos: int = 1024) -> torch.Tensor:
    inv = 1.0 / 10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    return build_cos_sin_cache(inv.to(device), max_pos, dtype)


def qkv_views(t: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided [T, H, D] views of one fused projection output (as the model passes them)."""
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(device)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return qkv, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def decode_batch(ctx: list[int], hkv: int, group: int, d: int, page: int, dtype: torch.dtype,
                 device: torch.device, seed: int = 0) -> dict:
    """Decode rows with ``ctx[i]`` cached tokens (random cache); ctx -1 = a padded row (seq_len 0,
    slot -1), as in a captured CUDA graph."""
    gen = torch.Generator().manual_seed(seed)
    b = len(ctx)
    seq_lens = [c + 1 if c >= 0 else 0 for c in ctx]
    width = max(max(seq_lens) // page + 2, 2)
    num_blocks = b * width + 3
    tables = torch.randperm(num_blocks, generator=gen)[:b * width].view(b, width).to(torch.int32)
    slots = [int(tables[i, (s - 1) // page]) * page + (s - 1) % page if s else -1 for i, s in enumerate(seq_lens)]
    _, q, k, v = qkv_views(b, hkv * group, hkv, d, dtype, device, gen)
    kc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype).to(device)
    vc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype).to(device)
    return dict(q=q, k=k, v=v, kc=kc, vc=vc, tables=tables.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                qsl=torch.arange(b + 1, dtype=torch.int32, device=device),
                slots=torch.tensor(slots, dtype=torch.int64, device=device),
                pos=torch.tensor([max(s - 1, 0) for s in seq_lens], device=device), max_len=max(seq_lens))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,rot,group", [(64, 64, 4), (64, 32, 1)])
def test_rope_and_cache(device: torch.device, dtype: torch.dtype, d: int, rot: int, group: int) -> None:
    gen = torch.Generator().manual_seed(1)
    t, hkv, page, num_blocks = 9, 2, 16, 8
    _, q, k, v = qkv_views(t, hkv * group, hkv, d, dtype, device, gen)
    pos = torch.randint(0, 1000, (t,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * page, generator=gen)[:t].to(device)
    slots[3] = -1
    kc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype).to(device)
    vc = torch.randn_like(kc)
    cache = cos_sin(rot, device, dtype)
    q_ref, k_ref, kc_ref, vc_ref = q.clone(), k.clone(), kc.clone(), vc.clone()
    rope_and_cache_ref(pos, q_ref, k_ref, v, kc_ref, vc_ref, slots, cache)
    rope_and_cache(pos, q, k, v, kc, vc, slots, cache)
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    for out, ref in [(q, q_ref), (k, k_ref), (kc, kc_ref), (vc, vc_ref)]:
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@needs_triton
@pytest.mark.parametrize("num_splits,fused_reduce,solo", [(1, True, 0), (3, True, 0), (8, True, 0), (8, False, 0),
                                                          (8, True, 2), (8, False, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_append(device: torch.device, num_splits: int, fused_reduce: bool, solo: int,
                       dtype: torch.dtype) -> None:
    """Rotate + append + attend in the decode launch == rope_and_cache_ref + paged_attention_ref;
    short contexts use fewer splits than launched (or one program, up to ``solo`` tiles), and a
    padded row writes nothing."""
    bt = decode_batch([150, 6, -1, 63, 200, 0], hkv=2, group=4, d=64, page=16, dtype=dtype, device=device)
    cache = cos_sin(64, device, dtype)
    q0, k0 = bt["q"].clone(), bt["k"].clone()
    append = DecodeAppend(bt["pos"], cache, bt["k"], bt["v"], bt["slots"])
    kc_ref, vc_ref = bt["kc"].clone(), bt["vc"].clone()
    ref = torch.zeros(bt["q"].shape, dtype=torch.float32, device=device)
    args = (bt["qsl"], bt["seq_lens"], bt["tables"], 0.125, 1, bt["max_len"])
    paged_attention_ref(bt["q"], kc_ref, vc_ref, ref, *args, append=append)
    out = torch.full(bt["q"].shape, float("nan"), dtype=dtype, device=device)
    paged_attention(bt["q"], bt["kc"], bt["vc"], out, *args, num_decodes=6, max_decode_seq_len=bt["max_len"],
                    num_splits=num_splits, append=append, fused_reduce=fused_reduce, solo_tiles=solo)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert torch.equal(out[2], torch.zeros_like(out[2]))        # padded row
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)   # fused multiply-adds on the GPU
    torch.testing.assert_close(bt["kc"], kc_ref, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(bt["vc"], vc_ref, rtol=0, atol=0)
    assert torch.equal(bt["q"], q0) and torch.equal(bt["k"], k0)  # rotated in registers only


@needs_triton
def test_fused_reduce_counters_rearm(device: torch.device) -> None:
    """The in-kernel reduce leaves its arrival counters at zero, so back-to-back launches agree."""
    bt = decode_batch([300, 130], hkv=2, group=2, d=64, page=16, dtype=torch.float32, device=device, seed=3)
    args = (bt["q"], bt["kc"], bt["vc"])
    outs = []
    for _ in range(3):
        out = torch.empty(bt["q"].shape, device=device)
        paged_attention(*args, out, bt["qsl"], bt["seq_lens"], bt["tables"], 0.125, 1, bt["max_len"],
                        num_splits=4, solo_tiles=0)
        outs.append(out)
    ref = torch.empty_like(outs[0])
    paged_attention_ref(*args, ref, bt["qsl"], bt["seq_lens"], bt["tables"], 0.125)
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


def _meta(q_lens: list[int], seq_lens: list[int], tables: torch.Tensor, slots: torch.Tensor,
          device: torch.device) -> AttentionMetadata:
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    nd = 0
    while nd < len(q_lens) and q_lens[nd] == 1:
        nd += 1
    return AttentionMetadata(
        num_decodes=nd, query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=tables,
        slot_mapping=slots, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        max_decode_seq_len=max(seq_lens[:nd], default=0), query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)


@needs_triton
@pytest.mark.parametrize("q_lens,ctx", [([1, 1, 1], [40, 3, 70]), ([1, 1, 9], [15, 40, 21])],
                         ids=["decode_only", "mixed"])
def test_backend_rope_matches_torch_backend(device: torch.device, q_lens: list[int], ctx: list[int]) -> None:
    """TritonAttentionBackend with un-rotated q/k + rope == rotate (reference) then the torch backend."""
    gen = torch.Generator().manual_seed(7)
    hkv, group, d, page = 2, 4, 64, 16
    seq_lens = [c + n for c, n in zip(ctx, q_lens)]
    width = max(seq_lens) // page + 2
    num_blocks = len(q_lens) * width
    tables = torch.randperm(num_blocks, generator=gen).view(len(q_lens), width).to(torch.int32)
    slots, pos = [], []
    for i, (c, n) in enumerate(zip(ctx, q_lens)):
        for p in range(c, c + n):
            slots.append(int(tables[i, p // page]) * page + p % page)
            pos.append(p)
    t = len(slots)
    _, q, k, v = qkv_views(t, hkv * group, hkv, d, torch.float32, device, gen)
    kc = torch.randn(num_blocks, page, hkv, d, generator=gen).to(device)
    vc = torch.randn_like(kc)
    tables = tables.to(device)
    meta = _meta(q_lens, seq_lens, tables, torch.tensor(slots, device=device), device)
    positions = torch.tensor(pos, device=device)
    cache = cos_sin(d, device, torch.float32)
    qr, kr, kc_ref, vc_ref = q.clone(), k.clone(), kc.clone(), vc.clone()
    rotary_embedding_ref(positions, qr, kr, d, cache)
    ref = TorchAttentionBackend.forward(qr, kr, v, kc_ref, vc_ref, meta, 0.125)
    out = TritonAttentionBackend.forward(q, k, v, kc, vc, meta, 0.125, rope=(positions, cache))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(kc, kc_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
