"""Batch-1 decode attention per layer at Gemma-2-9B's shape (8 KV heads x 2, head_dim 256, soft cap 50) next
to Llama-3.1-8B's (8 KV heads x 4, head_dim 128), for several decode tile configs, on one H200.

What a latency-1 step (128 prompt tokens, 256 decoded) launches per layer: the one-launch decode (rotate q/k,
append k/v, attend) over contexts 129..384, with the split-KV factor a batch-1 graph captures for the shape's
max_model_len and the in-kernel merge. Each row replays one CUDA graph of one launch per layer, every layer
with its own KV cache (so the cache is not hot in L2, as in a real step), and reports microseconds per launch;
``mean`` averages the contexts a latency-1 run meets. Every config is checked against ``paged_attention_ref``.
Then prefill attention (16 fresh prompts of 1,024 tokens, as a throughput-prefill step holds) per layer, in
TFLOP/s, for the default prefill tiles and a few others at head_dim 256.

    python3 benchmarks/gpu/bench_decode_attention_gpu.py      # about a minute
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aphrodite.kernels import paged_attention as pa  # noqa: E402
from aphrodite.kernels.rotary import build_cos_sin_cache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import graph_us  # noqa: E402

PAGE = 16
DEVICE = torch.device("cuda")
CONTEXTS = (129, 192, 256, 320, 384, 1024)
SHAPES = {   # name: (kv heads, group, head_dim, soft cap, max_model_len, layers)
    "llama-3.1-8b": (8, 4, 128, None, 131072, 32),
    "gemma-2-9b": (8, 2, 256, 50.0, 8192, 42),
}
# Per shape: ((BLOCK_N, num_warps, num_stages), solo_tiles) pairs to try; None = the shipped default
# (``_decode_tiles``, ``decode_solo_tiles``); solo_tiles 0 always splits.
CONFIGS = {"llama-3.1-8b": ((None, None), ((64, 4, 3), None)),
           "gemma-2-9b": ((None, None), (None, 0), ((64, 4, 2), 0), ((64, 4, 2), 2), ((32, 4, 3), 0), ((32, 8, 2), 0))}


def case(hkv: int, g: int, d: int, ctx: int, layers: int) -> dict:
    blocks = -(-1024 // PAGE) + 1
    dev, dt = DEVICE, torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt)
    caches = [(randn(blocks, PAGE, hkv, d), randn(blocks, PAGE, hkv, d)) for _ in range(layers)]
    table = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
    return dict(
        caches=caches, table=table, q=randn(1, hkv * g, d), k=randn(1, hkv, d), v=randn(1, hkv, d),
        pos=torch.tensor([ctx - 1], device=dev), slots=torch.tensor([ctx - 1], device=dev),
        qsl=torch.tensor([0, 1], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([ctx], dtype=torch.int32, device=dev),
        cs=build_cos_sin_cache(1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=dev) / d),
                               2048, dt))


def run(c: dict, layer: int, out: torch.Tensor, d: int, cap: float | None, max_len: int, solo: int | None,
        ref: bool = False) -> torch.Tensor:
    kc, vc = c["caches"][layer]
    append = pa.DecodeAppend(c["pos"], c["cs"], c["k"], c["v"], c["slots"])
    fn = pa.paged_attention_ref if ref else pa.paged_attention
    kw = {} if ref or solo is None else {"solo_tiles": solo}
    return fn(c["q"], kc, vc, out, c["qsl"], c["seq_lens"], c["table"], d ** -0.5, 1, max_len, num_decodes=1,
              max_decode_seq_len=max_len, append=append, logits_soft_cap=cap, **kw)


def time_layers(c: dict, d: int, cap: float | None, max_len: int, solo: int | None) -> float:
    """Microseconds per launch: one graph of one launch per layer cache, replayed."""
    layers = len(c["caches"])
    out = torch.empty_like(c["q"])
    for i in range(layers):
        run(c, i, out, d, cap, max_len, solo)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            run(c, i, out, d, cap, max_len, solo)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * layers)


PREFILL_PROMPTS, PREFILL_LEN = 16, 1024
# (BLOCK_M, BLOCK_N, num_warps, num_stages) for head_dim 256 prefill; None = _prefill_tiles' choice
PREFILL_CONFIGS = {"llama-3.1-8b": (None,),
                   "gemma-2-9b": (None, (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2))}


def prefill_rows() -> list[str]:
    """Causal prefill of PREFILL_PROMPTS fresh prompts (cache written first, as rope_and_cache does)."""
    default = pa._prefill_tiles
    rows = []
    n, t = PREFILL_PROMPTS, PREFILL_PROMPTS * PREFILL_LEN
    for name, (hkv, g, d, cap, _, _) in SHAPES.items():
        blocks_per = PREFILL_LEN // PAGE
        kc = torch.randn(n * blocks_per, PAGE, hkv, d, device=DEVICE, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        table = torch.arange(n * blocks_per, dtype=torch.int32, device=DEVICE).view(n, blocks_per)
        q = torch.randn(t, hkv * g, d, device=DEVICE, dtype=torch.bfloat16)
        qsl = torch.arange(0, t + 1, PREFILL_LEN, dtype=torch.int32, device=DEVICE)
        seq_lens = torch.full((n,), PREFILL_LEN, dtype=torch.int32, device=DEVICE)
        out = torch.empty_like(q)
        flops = 4 * n * (PREFILL_LEN * (PREFILL_LEN + 1) / 2) * hkv * g * d   # QK^T and PV, causal half
        for cfg in PREFILL_CONFIGS[name]:
            if cfg is None:
                pa._prefill_tiles = default
                label = "default " + "/".join(map(str, (lambda x: (x[0], x[2], x[3], x[4]))(
                    default(g, d, PREFILL_LEN))))
            else:
                pa._prefill_tiles = lambda g_, d_pad, mq, cfg=cfg: (cfg[0], cfg[0] // g_, cfg[1], cfg[2], cfg[3])
                label = "/".join(map(str, cfg))
            call = functools.partial(pa.paged_attention, q, kc, vc, out, qsl, seq_lens, table, d ** -0.5, PREFILL_LEN,
                                     PREFILL_LEN, num_decodes=0, logits_soft_cap=cap)
            try:
                call()
                ref = torch.empty_like(q[:PREFILL_LEN])
                pa.paged_attention_ref(q[:PREFILL_LEN], kc, vc, ref, qsl[:2], seq_lens[:1], table[:1], d ** -0.5,
                                       logits_soft_cap=cap)
                err = (out[:PREFILL_LEN].float() - ref.float()).abs().max().item()
                for _ in range(2):
                    call()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    call()
                end.record()
                end.synchronize()
                us = start.elapsed_time(end) * 1e3 / 10
            except Exception as e:
                rows.append(f"| {name} | {label} | failed: {type(e).__name__}: {str(e)[:120]} |")
                continue
            rows.append(f"| {name} | {label} | {err:.1e} | {us:.0f} | {flops / us / 1e6:.0f} |")
            print(rows[-1], flush=True)
    pa._prefill_tiles = default
    return rows


def fixed_decode_tiles(cfg: tuple[int, int, int]):
    """A stand-in for ``paged_attention._decode_tiles`` that always answers ``cfg`` (BLOCK_N, warps, stages)."""
    def tiles(g: int, d_pad: int, splits: int = 1) -> tuple[int, int, int, int]:
        return (max(16, 1 << max(0, g - 1).bit_length()), *cfg)
    return tiles


BATCH, BATCH_CTX = 256, 1088   # a throughput-prefill decode step: 256 sequences in the middle of their 128 outputs


def batched_rows() -> list[str]:
    """Decode of BATCH sequences at BATCH_CTX tokens per layer (KV streamed once): us and the KV read rate,
    for the default decode tiles and the wider ones at head_dim 256."""
    default = pa._decode_tiles
    rows = []
    for name, (hkv, g, d, cap, _, _) in SHAPES.items():
        per = -(-BATCH_CTX // PAGE)
        kc = torch.randn(BATCH * per, PAGE, hkv, d, device=DEVICE, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        table = torch.arange(BATCH * per, dtype=torch.int32, device=DEVICE).view(BATCH, per)
        q = torch.randn(BATCH, hkv * g, d, device=DEVICE, dtype=torch.bfloat16)
        qsl = torch.arange(BATCH + 1, dtype=torch.int32, device=DEVICE)
        seq_lens = torch.full((BATCH,), BATCH_CTX, dtype=torch.int32, device=DEVICE)
        out = torch.empty_like(q)
        kv_bytes = 2 * BATCH * BATCH_CTX * hkv * d * 2
        for cfg in (None,) if d <= 128 else (None, (32, 4, 2), (64, 8, 2)):
            pa._decode_tiles = default if cfg is None else fixed_decode_tiles(cfg)
            label = "default " + "/".join(map(str, default(g, d, 1)[1:])) if cfg is None else "/".join(map(str, cfg))
            call = functools.partial(pa.paged_attention, q, kc, vc, out, qsl, seq_lens, table, d ** -0.5, 1,
                                     BATCH_CTX, num_decodes=BATCH, logits_soft_cap=cap)
            try:
                us = graph_us(call, reps=20)
            except Exception as e:
                rows.append(f"| {name} | {label} | failed: {type(e).__name__}: {str(e)[:120]} |")
                continue
            rows.append(f"| {name} | {label} | {us:.0f} | {kv_bytes / us / 1e3:.0f} |")
            print(rows[-1], flush=True)
    pa._decode_tiles = default
    return rows


def main() -> None:
    default_tiles = pa._decode_tiles
    torch.manual_seed(0)
    rows = []
    for name, (hkv, g, d, cap, max_len, layers) in SHAPES.items():
        cases = {ctx: case(hkv, g, d, ctx, layers) for ctx in CONTEXTS}
        splits = pa.choose_num_splits(1, hkv, max_len, torch.device("cuda"))
        for cfg, solo in CONFIGS[name]:
            if cfg is None:
                pa._decode_tiles = default_tiles
            else:
                pa._decode_tiles = fixed_decode_tiles(cfg)
            label = ("default " + "/".join(map(str, default_tiles(g, d, splits)[1:]))) if cfg is None \
                else "/".join(map(str, cfg))
            try:
                c = cases[384]   # correctness at the longest latency-1 context (split or not)
                out = run(c, 0, torch.empty_like(c["q"]), d, cap, max_len, solo)
                kc, vc = c["caches"][0]
                ref = run({**c, "caches": [(kc.clone(), vc.clone())]}, 0, torch.empty_like(c["q"]), d, cap,
                          max_len, solo, ref=True)
                err = (out.float() - ref.float()).abs().max().item()
                us = {ctx: time_layers(cases[ctx], d, cap, max_len, solo) for ctx in CONTEXTS}
            except Exception as e:   # a config that does not compile (registers, shared memory)
                print(f"{name} {label} solo={solo}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            lat1 = sum(us[x] for x in CONTEXTS if x <= 384) / sum(1 for x in CONTEXTS if x <= 384)
            rows.append((name, label, solo, splits, err, us, lat1))
            print(f"{name} {label} solo={solo}: " + " ".join(f"{x}:{v:.1f}" for x, v in us.items()), flush=True)
        pa._decode_tiles = default_tiles
    print("\n== decode attention, us per layer launch (batch 1, graph-captured split factor) ==")
    print("| shape | BLOCK_N/warps/stages | solo_tiles | splits | max err | " + " | ".join(f"ctx {x}" for x in CONTEXTS)
          + " | mean ctx<=384 |")
    for name, label, solo, splits, err, us, lat1 in rows:
        print(f"| {name} | {label} | {'default' if solo is None else solo} | {splits} | {err:.1e} | "
              + " | ".join(f"{us[x]:.1f}" for x in CONTEXTS) + f" | {lat1:.1f} |")
    prefill = prefill_rows()
    print(f"\n== prefill attention, {PREFILL_PROMPTS} prompts x {PREFILL_LEN} tokens, per layer ==")
    print("| shape | BLOCK_M/BLOCK_N/warps/stages | max err | us | TFLOP/s |")
    print("\n".join(prefill))
    batched = batched_rows()
    print(f"\n== batched decode attention, {BATCH} sequences x {BATCH_CTX} tokens, per layer ==")
    print("| shape | BLOCK_N/warps/stages | us | KV GB/s |")
    print("\n".join(batched))


if __name__ == "__main__":
    main()
