#!/usr/bin/env python3
"""Check and time aphrodite.kernels on a CUDA GPU at Llama-3.1-8B shapes (needs only torch + triton).

For each kernel: relative error against its PyTorch reference (||out - ref|| / ||ref||, the reference in
fp32 math; NaN fails), then the median time from ``triton.testing.do_bench``, the bytes it must move
at least (each input read once, each output written once) over that time, as GB/s and as a share of
this card's measured device-to-device copy bandwidth, and TFLOP/s where the FLOPs matter (prefill).
The eager-PyTorch reference is timed too (``ref ms``) for a speed-up figure. A decode step is also
captured in a CUDA graph and replayed on changed lengths/slots to check graph safety.

    python benchmarks/kernels/check_kernels_gpu.py            # checks + timings, table last
    python benchmarks/kernels/check_kernels_gpu.py --sweep    # also try attention tile configs
    python benchmarks/kernels/check_kernels_gpu.py --splits   # also time split-KV factors in graphs
    python benchmarks/kernels/check_kernels_gpu.py --prologue-only  # the batch-1 decode attention block
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aphrodite.kernels import paged_attention as pa  # noqa: E402
from aphrodite.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from aphrodite.kernels.rmsnorm import (  # noqa: E402
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from aphrodite.kernels.rope_cache import rope_and_cache, rope_and_cache_ref  # noqa: E402
from aphrodite.kernels.rotary import build_cos_sin_cache, rotary_embedding, rotary_embedding_ref  # noqa: E402

HQ, HKV, D, PAGE, HIDDEN, INTER = 32, 8, 128, 16, 4096, 14336
DT = torch.bfloat16
DEV = torch.device("cuda")
ROWS: list[dict[str, object]] = []
FAILED: list[str] = []


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written, GB/s: the practical memory ceiling."""
    n = 1 << 30
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * n / ms / 1e6


def record(name: str, shape: str, err: float, tol: float, ms: float, ref_ms: float | None,
           nbytes: float, flops: float = 0.0) -> None:
    ok = err == err and err <= tol
    if not ok:
        FAILED.append(f"{name} {shape}: rel err {err:.2e} > {tol:.0e}")
    ROWS.append(dict(name=name, shape=shape, err=err, ok=ok, ms=ms, ref_ms=ref_ms,
                     gbs=nbytes / ms / 1e6, tflops=flops / ms / 1e9))
    ref_txt = f"{ref_ms:8.3f}" if ref_ms is not None else "       -"
    print(f"  {name:<22} {shape:<26} err {err:.2e} {'ok' if ok else 'FAIL'}  {ms:8.3f} ms  ref {ref_txt} ms  "
          f"{nbytes / ms / 1e6:8.1f} GB/s  {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)


# ---------------------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------------------

class Batch:
    """A flat batch over a randomly filled cache with shuffled block tables (decodes first)."""

    def __init__(self, q_lens: list[int], ctx_lens: list[int], seed: int = 0, spare_blocks: int = 64) -> None:
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.q_lens, self.ctx_lens = q_lens, ctx_lens
        self.seq_lens_l = [c + q for c, q in zip(ctx_lens, q_lens)]
        nblk = [math.ceil(s / PAGE) for s in self.seq_lens_l]
        width = max(nblk)
        num_blocks = sum(nblk) + spare_blocks
        perm = torch.randperm(num_blocks, device=DEV, generator=g).to(torch.int32)
        tables = torch.zeros(len(q_lens), width, dtype=torch.int32, device=DEV)
        used = 0
        for i, n in enumerate(nblk):
            tables[i, :n] = perm[used:used + n]
            used += n
        self.block_tables = tables
        self.k_cache = torch.randn(num_blocks, PAGE, HKV, D, device=DEV, dtype=DT, generator=g)
        self.v_cache = torch.randn(num_blocks, PAGE, HKV, D, device=DEV, dtype=DT, generator=g)
        t = sum(q_lens)
        self.q = torch.randn(t, HQ, D, device=DEV, dtype=DT, generator=g)
        self.k = torch.randn(t, HKV, D, device=DEV, dtype=DT, generator=g)
        self.v = torch.randn(t, HKV, D, device=DEV, dtype=DT, generator=g)
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        self.starts = starts
        self.qsl = torch.tensor(starts, dtype=torch.int32, device=DEV)
        self.seq_lens = torch.tensor(self.seq_lens_l, dtype=torch.int32, device=DEV)
        pos = torch.cat([torch.arange(c, c + q, device=DEV) for c, q in zip(ctx_lens, q_lens)])
        seq_of_tok = torch.repeat_interleave(torch.arange(len(q_lens), device=DEV),
                                             torch.tensor(q_lens, device=DEV))
        self.slot_mapping = (tables[seq_of_tok, pos // PAGE].long() * PAGE + pos % PAGE)
        self.num_decodes = 0
        while self.num_decodes < len(q_lens) and q_lens[self.num_decodes] == 1:
            self.num_decodes += 1
        self.max_query_len = max(q_lens)
        self.max_seq_len = max(self.seq_lens_l)
        dec = self.seq_lens_l[:self.num_decodes]
        self.max_decode_seq_len = max(dec) if dec else 0
        self.scale = D ** -0.5

    def meta(self) -> object:
        from aphrodite.modeling.layers.attention import AttentionMetadata

        return AttentionMetadata(
            num_decodes=self.num_decodes, query_start_loc=self.qsl,
            seq_lens=self.seq_lens, block_tables=self.block_tables, slot_mapping=self.slot_mapping,
            max_query_len=self.max_query_len, max_seq_len=self.max_seq_len,
            max_decode_seq_len=self.max_decode_seq_len, query_start_loc_cpu=self.starts,
            seq_lens_cpu=self.seq_lens_l)

    def attend(self, out: torch.Tensor, num_splits: int | None = None) -> torch.Tensor:
        return pa.paged_attention(self.q, self.k_cache, self.v_cache, out, self.qsl, self.seq_lens,
                                  self.block_tables, self.scale, self.max_query_len, self.max_seq_len,
                                  num_decodes=self.num_decodes, max_decode_seq_len=self.max_decode_seq_len,
                                  num_splits=num_splits)

    def reference(self) -> torch.Tensor:
        ref = torch.empty(self.q.shape, dtype=torch.float32, device=DEV)
        return pa.paged_attention_ref(self.q, self.k_cache, self.v_cache, ref, self.qsl, self.seq_lens,
                                      self.block_tables, self.scale)

    def min_bytes(self) -> float:
        e = self.q.element_size()
        kv = sum(self.seq_lens_l) * HKV * D * 2 * e
        return kv + 2 * self.q.numel() * e

    def flops(self) -> float:
        visible = sum(q * c + q * (q + 1) // 2 for c, q in zip(self.ctx_lens, self.q_lens))
        return 4.0 * HQ * D * visible


def torch_backend_ms(b: Batch) -> float | None:
    """Time the plain-PyTorch backend on the same batch, if the modeling package imports."""
    try:
        from aphrodite.modeling.layers.attention import TorchAttentionBackend
    except Exception as exc:
        print(f"  (TorchAttentionBackend unavailable: {exc})")
        return None
    meta = b.meta()
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    return bench(lambda: TorchAttentionBackend.forward(b.q, b.k, b.v, kc, vc, meta, b.scale))


def check_attention(name: str, b: Batch, num_splits: int | None = None, with_ref_time: bool = True) -> None:
    pa.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    ref = b.reference()
    out = torch.full(b.q.shape, float("nan"), dtype=DT, device=DEV)
    b.attend(out, num_splits)
    err = rel_err(out, ref)
    ms = bench(lambda: b.attend(out, num_splits))
    ref_ms = torch_backend_ms(b) if with_ref_time else None
    splits = num_splits if num_splits is not None else (
        pa.choose_num_splits(b.num_decodes, HKV, b.max_decode_seq_len, DEV) if b.num_decodes else 1)
    shape = f"{name} s={splits}"
    record("paged_attention", shape, err, 2e-2, ms, ref_ms, b.min_bytes(), b.flops())


def check_reshape_and_cache(t: int) -> None:
    b = Batch([t], [0], seed=3)
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    pa.reshape_and_cache_ref(b.k, b.v, kc, vc, b.slot_mapping)
    pa.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    err = max(rel_err(b.k_cache, kc), rel_err(b.v_cache, vc))
    ms = bench(lambda: pa.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping))
    ref_ms = bench(lambda: pa.reshape_and_cache_ref(b.k, b.v, kc, vc, b.slot_mapping))
    record("reshape_and_cache", f"T={t}", err, 0.0, ms, ref_ms, 4 * b.k.numel() * b.k.element_size())


def check_cuda_graph_decode(num: int, ctx: int) -> None:
    """Capture TritonAttentionBackend.forward for a decode step, then replay it after changing the
    lengths, slots and inputs in place: the replay must match the reference on the new state."""
    b = Batch([1] * num, [ctx - 1] * num, seed=11)
    meta = b.meta()
    pa.TritonAttentionBackend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, meta, b.scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.TritonAttentionBackend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, meta, b.scale)
    new_lens = torch.randint(1, ctx + 1, (num,), device=DEV, dtype=torch.int32)
    b.seq_lens.copy_(new_lens)
    pos = new_lens.long() - 1
    b.slot_mapping.copy_(b.block_tables[torch.arange(num, device=DEV), pos // PAGE].long() * PAGE + pos % PAGE)
    b.q.normal_()
    b.k.normal_()
    b.v.normal_()
    graph.replay()
    ref = b.reference()  # the replay wrote k/v into the new slots
    err = rel_err(out, ref)
    ms = bench(graph.replay)
    lens = new_lens.tolist()
    b.seq_lens_l = lens
    record("decode CUDA graph", f"{num}x ctx<={ctx}", err, 2e-2, ms, None, b.min_bytes())


def sweep_attention() -> None:
    """Try a few tile configs per launch shape (monkeypatching the module's tile pickers)."""
    print("\n== attention tile sweep ==")
    orig_p, orig_d = pa._prefill_tiles, pa._decode_tiles
    cases = {"prefill 8x1024": Batch([1024] * 8, [0] * 8, seed=5), "prefill 1x128": Batch([128], [0], seed=6)}
    for name, b in cases.items():
        pa.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
        ref = b.reference()
        out = torch.empty(b.q.shape, dtype=DT, device=DEV)
        for bm, bn, w, st in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                              (128, 32, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)]:
            pa._prefill_tiles = lambda g, dp, mq, bm=bm, bn=bn, w=w, st=st: (bm, bm // g, bn, w, st)
            try:
                b.attend(out)
                err = rel_err(out, ref)
                ms = bench(lambda b=b, out=out: b.attend(out))
                print(f"  {name:<16} BM={bm:<4} BN={bn:<4} warps={w} stages={st}: {ms:8.3f} ms "
                      f"{b.flops() / ms / 1e9:6.1f} TFLOP/s err {err:.1e}", flush=True)
            except Exception as exc:
                print(f"  {name:<16} BM={bm} BN={bn} warps={w} stages={st}: failed {type(exc).__name__}")
        pa._prefill_tiles = orig_p
    cases = {"decode 256x1024": (Batch([1] * 256, [1023] * 256, seed=7), None),
             "decode 1x8192": (Batch([1], [8191], seed=8), None)}
    for name, (b, _) in cases.items():
        pa.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
        ref = b.reference()
        out = torch.empty(b.q.shape, dtype=DT, device=DEV)
        for bn, w, st in [(64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 4, 2), (128, 8, 3), (16, 4, 4)]:
            pa._decode_tiles = lambda g, dp, splits=1, bn=bn, w=w, st=st: (max(16, g), bn, w, st)
            for splits in ([None] if b.num_decodes > 8 else [None, 8, 16, 32, 64]):
                try:
                    b.attend(out, splits)
                    err = rel_err(out, ref)
                    ms = bench(lambda b=b, out=out, s=splits: b.attend(out, s))
                    print(f"  {name:<16} BN={bn:<4} warps={w} stages={st} splits={splits}: {ms:8.3f} ms "
                          f"{b.min_bytes() / ms / 1e6:7.1f} GB/s err {err:.1e}", flush=True)
                except Exception as exc:
                    print(f"  {name:<16} BN={bn} warps={w} stages={st}: failed {type(exc).__name__}")
        pa._decode_tiles = orig_d


def sweep_splits() -> None:
    """Split-KV factor vs decode time inside CUDA graphs (no Python launch overhead in the numbers)."""
    print("\n== split-KV sweep (CUDA graph replay of paged_attention alone) ==")
    for num, ctx in [(1, 8192), (1, 32768), (4, 8192), (16, 4096), (64, 2048)]:
        b = Batch([1] * num, [ctx - 1] * num, seed=num)
        pa.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
        ref = b.reference()
        chosen = pa.choose_num_splits(num, HKV, ctx, DEV)
        line = []
        for splits in [1, 2, 4, 8, 16, 32, 64]:
            out = torch.full(b.q.shape, float("nan"), dtype=DT, device=DEV)
            b.attend(out, splits)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                b.attend(out, splits)
            graph.replay()
            err = rel_err(out, ref)
            ms = bench(graph.replay)
            line.append(f"s={splits}:{ms * 1e3:.0f}us{'' if err < 2e-2 else '(ERR)'}")
        print(f"  {num}x{ctx} (heuristic {chosen}): " + " ".join(line), flush=True)


def check_rope_and_cache(t: int) -> None:
    """Fused rotary + cache write vs its reference (q/k/v as views of one qkv output)."""
    b = Batch([t], [0], seed=9)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
    cache = build_cos_sin_cache(inv_freq, 8192, DT)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, device=DEV, dtype=DT)

    def views(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = x.split([HQ * D, HKV * D, HKV * D], dim=-1)
        return q.view(t, HQ, D), k.view(t, HKV, D), v.view(t, HKV, D)

    ref_qkv, kc, vc = qkv.clone(), b.k_cache.clone(), b.v_cache.clone()
    rope_and_cache_ref(pos, *views(ref_qkv), kc, vc, b.slot_mapping, cache)
    work = qkv.clone()
    rope_and_cache(pos, *views(work), b.k_cache, b.v_cache, b.slot_mapping, cache)
    err = max(rel_err(work, ref_qkv), rel_err(b.k_cache, kc), rel_err(b.v_cache, vc))
    ms = bench(lambda: rope_and_cache(pos, *views(work), b.k_cache, b.v_cache, b.slot_mapping, cache))
    ref_ms = bench(lambda: rope_and_cache_ref(pos, *views(ref_qkv), kc, vc, b.slot_mapping, cache))
    nbytes = (2 * (HQ + HKV) + 3 * HKV) * D * t * qkv.element_size()
    record("rope_and_cache", f"T={t}", err, 1e-2, ms, ref_ms, nbytes)


def _decode_block(b: Batch, qkv: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, out: torch.Tensor,
                  mode: str, splits: int) -> None:
    """One layer's decode attention block on qkv [1, (HQ + 2 HKV) * D]: ``before`` = rotary, cache
    write, attention, split reduce (4 launches); ``after`` = one fused launch."""
    q, k, v = (x.view(1, -1, D) for x in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))
    args = (b.k_cache, b.v_cache, out, b.qsl, b.seq_lens, b.block_tables, b.scale, 1, 131072)
    if mode == "before":
        rotary_embedding(pos, q, k, D, cache)
        pa.reshape_and_cache(k, v, b.k_cache, b.v_cache, b.slot_mapping)
        pa.paged_attention(q, *args, num_splits=splits, fused_reduce=False, solo_tiles=0)
    else:   # "after": as the engine runs it; "after+reduce": split partials merged by the reduce kernel
        pa.paged_attention(q, *args, num_splits=splits, append=pa.DecodeAppend(pos, cache, k, v, b.slot_mapping),
                           fused_reduce=mode == "after")


def check_decode_prologue(layers: int = 32) -> None:
    """A batch-1 decode step's attention block, as the 8B model's CUDA graph runs it ``layers`` times:
    before (4 launches) vs after (1 launch: rotate, append and merge splits in-kernel; one program up
    to ``DECODE_SOLO_TILES`` tiles) vs after+reduce (the merge as a second launch), with the split
    factor decode graphs capture (heuristic at context 131072) and with no split. Prints us per
    layer; the fused replays are checked against the references."""
    print(f"\n== batch-1 decode attention block in a CUDA graph ({layers} layers per replay) ==")
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
    cache = build_cos_sin_cache(inv_freq, 8192 + 1, DT)
    captured = pa.choose_num_splits(1, HKV, 131072, DEV)
    for ctx in (128, 384, 2048, 8192):
        b = Batch([1], [ctx - 1], seed=ctx)
        qkv = torch.randn(1, (HQ + 2 * HKV) * D, device=DEV, dtype=DT)
        pos = torch.tensor([ctx - 1], device=DEV)
        out = torch.empty(1, HQ, D, device=DEV, dtype=DT)
        times = {}
        for mode, splits in (("before", captured), ("after", captured), ("after+reduce", captured), ("after", 1)):
            work = qkv.clone()
            _decode_block(b, work, pos, cache, out, mode, splits)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(layers):
                    _decode_block(b, work, pos, cache, out, mode, splits)
            work.copy_(qkv)
            graph.replay()
            err = 0.0
            if mode != "before":   # "before" re-rotates q/k in place every layer: not comparable
                q, k, v = (x.view(1, -1, D) for x in qkv.clone().split([HQ * D, HKV * D, HKV * D], dim=-1))
                rotary_embedding_ref(pos, q, k, D, cache)
                ref = torch.empty(1, HQ, D, device=DEV, dtype=torch.float32)
                kc, vc = b.k_cache.clone(), b.v_cache.clone()
                pa.reshape_and_cache_ref(k, v, kc, vc, b.slot_mapping)
                pa.paged_attention_ref(q, kc, vc, ref, b.qsl, b.seq_lens, b.block_tables, b.scale)
                err = rel_err(out, ref)
            ms = bench(graph.replay) / layers
            times[f"{mode} s={splits}"] = ms
            record("decode attn block", f"1x ctx {ctx} {mode} s={splits}", err, 2e-2, ms, None, b.min_bytes())
        print(f"  ctx {ctx}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in times.items()), flush=True)

# ---------------------------------------------------------------------------------------------------
# Elementwise kernels
# ---------------------------------------------------------------------------------------------------

def check_rms_norm(t: int) -> None:
    x = torch.randn(t, HIDDEN, device=DEV, dtype=DT) * 3
    r = torch.randn(t, HIDDEN, device=DEV, dtype=DT)
    w = (1 + 0.1 * torch.randn(HIDDEN, device=DEV)).to(DT)
    e = x.element_size()
    err = rel_err(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    record("rms_norm", f"{t}x{HIDDEN}", err, 1e-2, bench(lambda: rms_norm(x, w, 1e-5)),
           bench(lambda: rms_norm_ref(x, w, 1e-5)), 2 * x.numel() * e)
    out, res = fused_add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-5)
    err = max(rel_err(out, ref_out), rel_err(res, ref_res))
    record("fused_add_rms_norm", f"{t}x{HIDDEN}", err, 1e-2, bench(lambda: fused_add_rms_norm(x, r, w, 1e-5)),
           bench(lambda: fused_add_rms_norm_ref(x, r, w, 1e-5)), 4 * x.numel() * e)


def check_rotary(t: int) -> None:
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
    cache = build_cos_sin_cache(inv_freq, 8192)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, device=DEV, dtype=DT)
    qkv_ref = qkv.clone()

    def views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :HQ * D], x[:, HQ * D:(HQ + HKV) * D]

    rotary_embedding(pos, *views(qkv), D, cache)
    rotary_embedding_ref(pos, *views(qkv_ref), D, cache)
    err = rel_err(qkv, qkv_ref)
    nbytes = 2 * t * (HQ + HKV) * D * qkv.element_size() + t * D * 4
    record("rotary_embedding", f"T={t}", err, 1e-2, bench(lambda: rotary_embedding(pos, *views(qkv), D, cache)),
           bench(lambda: rotary_embedding_ref(pos, *views(qkv_ref), D, cache)), nbytes)


def check_silu_and_mul(t: int) -> None:
    x = torch.randn(t, 2 * INTER, device=DEV, dtype=DT) * 3
    err = rel_err(silu_and_mul(x), silu_and_mul_ref(x))
    record("silu_and_mul", f"{t}x{2 * INTER}", err, 1e-2, bench(lambda: silu_and_mul(x)),
           bench(lambda: silu_and_mul_ref(x)), 1.5 * x.numel() * x.element_size())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep attention tile configs")
    ap.add_argument("--splits", action="store_true", help="also sweep the split-KV factor in CUDA graphs")
    ap.add_argument("--skip-checks", action="store_true", help="only the sweeps")
    ap.add_argument("--prologue-only", action="store_true",
                    help="only the fused rotary/cache-write checks and the batch-1 decode attention block")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)

    if args.prologue_only:
        check_rope_and_cache(1)
        check_rope_and_cache(8192)
        check_decode_prologue()
    elif not args.skip_checks:
        print("\n== paged attention (Llama-3.1-8B: 32 q heads, 8 kv heads, d=128, block 16, bf16) ==")
        check_reshape_and_cache(8192)
        check_attention("prefill 1x128", Batch([128], [0], seed=1))
        check_attention("prefill 8x1024", Batch([1024] * 8, [0] * 8, seed=2))
        check_attention("chunk 512 after 3584", Batch([512], [3584], seed=3))
        check_attention("decode 256 ctx1024", Batch([1] * 256, [1023] * 256, seed=4))
        check_attention("decode 1 ctx8192", Batch([1], [8191], seed=5))
        check_attention("decode 1 ctx8192", Batch([1], [8191], seed=5), num_splits=1, with_ref_time=False)
        check_attention("decode 16 ctx4096", Batch([1] * 16, [4095] * 16, seed=6))
        check_attention("mixed 64dec+1x512", Batch([1] * 64 + [512], [1023] * 64 + [0], seed=7))
        check_cuda_graph_decode(256, 1024)
        check_cuda_graph_decode(1, 8192)
        print("\n== elementwise ==")
        check_rope_and_cache(1)
        check_rope_and_cache(8192)
        check_decode_prologue()
        for t in (256, 8192):
            check_rms_norm(t)
            check_rotary(t)
            check_silu_and_mul(t)
    if args.sweep:
        sweep_attention()
    if args.splits:
        sweep_splits()

    print(f"\nSummary ({props.name}; bandwidth share vs the {bw:.0f} GB/s copy; err = ||out-ref||/||ref||)")
    print(f"{'kernel':<20} {'case':<26} {'rel err':>8} {'ms':>8} {'ref ms':>8} {'x ref':>6} "
          f"{'GB/s':>7} {'%BW':>5} {'TFLOP/s':>8}")
    for r in ROWS:
        ref_ms = r["ref_ms"]
        speed = f"{ref_ms / r['ms']:6.1f}" if isinstance(ref_ms, float) else "     -"
        ref_txt = f"{ref_ms:8.3f}" if isinstance(ref_ms, float) else "       -"
        print(f"{r['name']:<20} {r['shape']:<26} {r['err']:8.1e} {r['ms']:8.3f} {ref_txt} {speed} "
              f"{r['gbs']:7.0f} {100 * r['gbs'] / bw:5.1f} {r['tflops']:8.1f}{'' if r['ok'] else '  FAIL'}")
    if FAILED:
        print("FAILED:\n  " + "\n  ".join(FAILED))
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "kernels_summary.txt").write_text("\n".join(str(r) for r in ROWS) + "\n")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
