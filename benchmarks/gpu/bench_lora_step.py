"""LoRA's share of a small decode step on one H200, Llama-3.1-8B shapes, under CUDA graphs (about 1 minute).

    python3 benchmarks/gpu/bench_lora_step.py

A synthetic decode step: 32 layers of the 8B model's four linear groups (qkv 4096->6144, o 4096->4096,
gate_up 4096->28672, down 14336->4096; each layer its own bf16 weights, so nothing stays in L2) as
cuBLAS GEMMs, with each group's LoRA (8 device slots of rank 16, q/k/v and gate/up fused with a
block-diagonal B) added by a path of ``aphrodite.kernels.lora``:

* ``split``: ``lora_shrink`` (split-K, atomics into a scratch zeroed once per step) + ``lora_expand``
  (what the layers use above ``TILE_MAX_TOKENS`` tokens);
* ``appended``: every slot's A rows appended to the base weight, so the GEMM gives the shrink too, then
  ``lora_expand_tokens`` (what plain-weight layers use up to ``TILE_MAX_TOKENS`` tokens);
* ``overlap``: ``lora_shrink_tiles`` on a side stream beside the GEMM, ``lora_expand_tiles`` after it
  (what other layers use up to ``TILE_MAX_TOKENS`` tokens);
* ``expand-only``: only ``lora_expand_tiles`` after each GEMM (the bound if the shrink were free).

1. Correctness at the 8B shapes: both kernel paths against the PyTorch reference (8 slots, base tokens).
2. Sweeps of the tile kernels' launch configs per group at 1 token, 32 distinct layers per CUDA graph
   (weights come from HBM as in the model): microseconds per launch.
3. Step time (one CUDA graph per step; ``-best``: the swept configs) at 1 token (one adapter) and
   8/32 tokens (spread over the 8 slots), and kernels per step (torch.profiler over one eager step).
The table last: per-step microseconds and the LoRA step as a percentage of the base step's speed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _timing import graph_us

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aphrodite.kernels.lora import (  # noqa: E402
    lora_expand,
    lora_expand_ref,
    lora_expand_tiles,
    lora_expand_tokens,
    lora_shrink,
    lora_shrink_ref,
    lora_shrink_tiles,
    lora_tiles_host,
    lora_token_metadata_host,
    num_tiles_bound,
    partials_buffer,
)

LAYERS, SLOTS, RANK = 32, 8, 16
GROUPS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
          "down": (14336, [4096])}
DEV = torch.device("cuda")
VARIANTS = ("split", "appended", "overlap", "expand-only")


def lora_weights(k: int, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``a [S, P*R, K]`` and block-diagonal ``b [S, N, P*R]`` as ``LoRALinear`` holds them."""
    p = len(sizes)
    a = torch.randn(SLOTS, p * RANK, k, device=DEV, dtype=torch.bfloat16) * 0.02
    b = torch.zeros(SLOTS, sum(sizes), p * RANK, device=DEV, dtype=torch.bfloat16)
    row = 0
    for i, size in enumerate(sizes):
        b[:, row:row + size, i * RANK:(i + 1) * RANK] = torch.randn(SLOTS, size, RANK, device=DEV) * 0.02
        row += size
    return a, b


class Step:
    """Per-step inputs (token slots, grouping, tiles) for ``tokens`` decode tokens."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        slots = np.zeros(tokens, dtype=np.int64) if tokens == 1 else np.arange(tokens, dtype=np.int64) % SLOTS
        if tokens > 1:
            slots[::5] = -1          # a few base-model tokens in the batch
        order, counts, starts = lora_token_metadata_host(slots, SLOTS)
        grid = num_tiles_bound(tokens, SLOTS)
        self.slots = torch.from_numpy(slots).to(DEV)
        self.meta = (self.slots, torch.from_numpy(order).to(DEV), torch.from_numpy(counts).to(DEV),
                     torch.from_numpy(starts).to(DEV))
        self.tiles = torch.from_numpy(lora_tiles_host(slots, SLOTS, grid)).to(DEV)
        width = max(len(s) for _, s in GROUPS.values()) * RANK
        self.scratch = torch.zeros(LAYERS, len(GROUPS), tokens, width, dtype=torch.float32, device=DEV)
        self.part = partials_buffer(grid, width, DEV)
        self.x = torch.randn(tokens, 4096, device=DEV, dtype=torch.bfloat16)
        self.h = torch.randn(tokens, 14336, device=DEV, dtype=torch.bfloat16)

    def input(self, k: int) -> torch.Tensor:
        return self.x if k == self.x.shape[1] else self.h


def correctness() -> list[str]:
    rows = []
    for tokens in (1, 16, 32):
        st = Step(tokens)
        for name, (k, sizes) in GROUPS.items():
            a, b = lora_weights(k, sizes)
            x = st.input(k)
            y0 = torch.randn(tokens, sum(sizes), device=DEV, dtype=torch.bfloat16) * 0.01   # bf16 ulp << delta
            ref = lora_expand_ref(lora_shrink_ref(x, a, st.slots), b, st.slots, y0.clone()).float()
            scale = (ref - y0.float()).abs().max().item()
            split = lora_expand(lora_shrink(x, a, st.meta), b, st.meta, y0.clone()).float()
            part = lora_shrink_tiles(x, a, st.tiles, st.part)
            tiles = lora_expand_tiles(part, b, st.tiles, y0.clone(), sizes, RANK).float()
            shrunk = F.linear(x, a.reshape(-1, k))
            tokens_ = lora_expand_tokens(shrunk, b, st.tiles, y0.clone(), sizes, RANK).float()
            for label, got in (("split", split), ("tiles", tiles), ("appended", tokens_)):
                err = (got - ref).abs().max().item()
                ok = err <= 0.03 * scale + 1e-3
                rows.append(f"check T={tokens} {name} {label}: max err {err:.3g} (delta {scale:.3g}) "
                            f"{'ok' if ok else 'FAILED'}")
                assert ok, rows[-1]
    return rows


SWEEPS = {   # kernel: launch configs tried per group ({}: the defaults); the expand's "split" is the shrink's
    "expand": [{}] + [{"split": sp, "block_n": bn, "num_warps": w} for sp in (16, 32) for bn in (32, 64)
                      for w in (1, 2)],
    "expand-tokens": [{}] + [{"block_n": bn, "num_warps": w} for bn in (16, 32, 64) for w in (1, 2)],
    "shrink": [{}] + [{"split": sp, "block_k": bk, "num_warps": w}
                      for sp in (16, 32) for bk in (64, 128) for w in (2, 4)],
}


def sweep(model: dict, st: Step, kernel: str) -> tuple[dict[str, list], list[str]]:
    """Launch configs of one tile kernel per group at ``st.tokens`` tokens, fastest first (LoRA kernels
    only, 32 layers per graph): ``{group: [(us, cfg), ...]}`` and printable rows."""
    ranked, rows = {}, []
    for name, (k, sizes) in GROUPS.items():
        x = st.input(k)
        ys = [torch.zeros(st.tokens, sum(sizes), device=DEV, dtype=torch.bfloat16) for _ in range(LAYERS)]
        results = []
        for cfg in SWEEPS[kernel]:
            if kernel == "shrink" and cfg and cfg["block_k"] * cfg["split"] > 2 * k:
                continue
            cfg = dict(cfg)
            split = cfg.pop("split", None) if kernel == "expand" else None
            part = lora_shrink_tiles(x, model[name][0][1], st.tiles, st.part, split=split)
            shrunk = F.linear(x, model[name][0][1].reshape(-1, k))

            def run(cfg=cfg, layers=model[name], x=x, ys=ys, sizes=sizes, part=part, shrunk=shrunk) -> None:
                for layer in range(LAYERS):
                    a, b = layers[layer][1:3]
                    if kernel == "expand-tokens":
                        lora_expand_tokens(shrunk, b, st.tiles, ys[layer], sizes, RANK, **cfg)
                    elif kernel == "expand":
                        lora_expand_tiles(part, b, st.tiles, ys[layer], sizes, RANK, **cfg)
                    else:
                        lora_shrink_tiles(x, a, st.tiles, st.part, **cfg)
            results.append((graph_us(run, reps=4) / LAYERS, cfg if split is None else {**cfg, "split": split}))
        default = results[0][0]
        results.sort(key=lambda r: r[0])
        ranked[name] = results
        second = results[min(1, len(results) - 1)]
        rows.append(f"sweep {kernel} {name} T={st.tokens}: best {results[0][0]:.2f} us {results[0][1]}, "
                    f"2nd {second[0]:.2f} us {second[1]}, default {default:.2f} us, "
                    f"worst {results[-1][0]:.2f} us")
    return ranked, rows


def best_pair(ranked: dict) -> dict:
    """Per group: the fastest expand config, and the fastest shrink config with the same K split."""
    out = {"expand": {}, "shrink": {}}
    for name, results in ranked["expand"].items():
        cfg = dict(results[0][1])
        split = cfg.pop("split", None)
        out["expand"][name] = cfg
        same = [c for _, c in ranked["shrink"][name] if c and c.get("split") == split]
        out["shrink"][name] = same[0] if same else ({"split": split} if split else {})
    return out


def step_fn(model: dict, st: Step, variant: str, cfgs: dict | None = None):
    side = torch.cuda.Stream()

    def run() -> None:
        if variant == "split":
            st.scratch.zero_()
        for layer in range(LAYERS):
            for g, (name, (k, sizes)) in enumerate(GROUPS.items()):
                w, a, b, wcat = model[name][layer]
                x = st.input(k)
                shrink_cfg, expand_cfg = ((cfgs or {}).get(key, {}).get(name, {}) for key in ("shrink", "expand"))
                part = st.part[:1]
                if variant.startswith("overlap"):
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        part = lora_shrink_tiles(x, a, st.tiles, st.part, **shrink_cfg)
                if variant == "appended":
                    wide = F.linear(x, wcat)
                    y = wide[:, :w.shape[0]]
                    lora_expand_tokens(wide[:, w.shape[0]:], b, st.tiles, y, sizes, RANK,
                                       **(cfgs or {}).get("expand-tokens", {}).get(name, {}))
                    continue
                y = F.linear(x, w)
                if variant == "split":
                    buf = st.scratch[layer, g, :, :a.shape[1]]
                    lora_expand(lora_shrink(x, a, st.meta, buf), b, st.meta, y)
                elif variant != "base":
                    if variant.startswith("overlap"):
                        torch.cuda.current_stream().wait_stream(side)
                    lora_expand_tiles(part, b, st.tiles, y, sizes, RANK, **expand_cfg)
    return run


def kernels_per_step(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def shrink_hidden(fn) -> str:
    """Replay one step's CUDA graph under torch.profiler: how many side-stream shrinks ran entirely
    inside another kernel (the GEMM) and their mean duration."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    shrinks = [e for e in ev if "shrink_tiles" in e.name]
    gemms = [e for e in ev if "tiles" not in e.name]
    inside = sum(1 for s in shrinks if any(g.time_range.start <= s.time_range.start and
                                           s.time_range.end <= g.time_range.end for g in gemms))
    expands = [e.time_range.elapsed_us() for e in ev if "expand_tiles" in e.name]
    mean = sum(e.time_range.elapsed_us() for e in shrinks) / max(1, len(shrinks))
    return (f"{inside}/{len(shrinks)} shrinks inside a GEMM, shrink {mean:.2f} us, expand "
            f"{sum(expands) / max(1, len(expands)):.2f} us (kernel time, profiled graph replay)")


def main() -> None:
    torch.manual_seed(0)
    for row in correctness():
        print(row, flush=True)
    model = {}
    for name, (k, sizes) in GROUPS.items():
        model[name] = []
        for _ in range(LAYERS):
            w = torch.empty(sum(sizes), k, device=DEV, dtype=torch.bfloat16).normal_(0, 0.02)
            a, b = lora_weights(k, sizes)
            model[name].append((w, a, b, torch.cat([w, a.reshape(-1, k)])))   # + the A rows appended
    steps = {t: Step(t) for t in (1, 8, 32)}
    ranked = {}
    for kernel in SWEEPS:
        ranked[kernel], rows = sweep(model, steps[1], kernel)
        for row in rows:
            print(row, flush=True)
    best = best_pair(ranked)
    best["expand-tokens"] = {name: results[0][1] for name, results in ranked["expand-tokens"].items()}
    table = []
    for tokens, st in steps.items():
        line = {"T": tokens, "base": graph_us(step_fn(model, st, "base"), reps=3)}
        for variant in VARIANTS:
            line[variant] = graph_us(step_fn(model, st, variant), reps=3)
        line["overlap-best"] = graph_us(step_fn(model, st, "overlap", best), reps=3)
        line["appended-best"] = graph_us(step_fn(model, st, "appended", best), reps=3)
        if tokens in (1, 32):
            line["kernels"] = {v: kernels_per_step(step_fn(model, st, v))
                               for v in ("base", "split", "appended", "overlap")}
            try:
                print(f"T={tokens} overlap: {shrink_hidden(step_fn(model, st, 'overlap'))}", flush=True)
            except Exception as e:      # a diagnostic only
                print(f"T={tokens} overlap profile failed: {type(e).__name__}: {e}", flush=True)
        table.append(line)
        print({k: (round(v) if isinstance(v, float) else v) for k, v in line.items()}, flush=True)
    print(f"\nbest configs at 1 token: {best}")
    cols = (*VARIANTS, "overlap-best", "appended-best")
    print("\n| tokens (8B shapes, 32 layers, 1 CUDA graph) | base us/step | " + " | ".join(f"+{c}" for c in cols)
          + " | kernels base/split/appended/overlap |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for ln in table:
        b = ln["base"]
        cells = " | ".join(f"{ln[v]:.0f} ({b / ln[v]:.1%})" for v in cols)
        k = ln.get("kernels")
        kc = "/".join(str(k[v]) for v in ("base", "split", "appended", "overlap")) if k else "-"
        print(f"| {ln['T']} | {b:.0f} | {cells} | {kc} |")


if __name__ == "__main__":
    main()
