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
2. Step time (one CUDA graph per step) at 1 token (one adapter) and 8/32 tokens (spread over the 8
   slots), and kernels per step at 1 token (torch.profiler over one eager step).
3. A sweep of ``lora_expand_tokens``' launch configs per group at 1 token, 32 distinct layers per CUDA
   graph (weights come from HBM as in the model): microseconds per launch; the appended step again
   with the best ones.
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


SWEEPS = {   # kernel: launch configs tried per group ({}: the defaults)
    "expand-tokens": [{}] + [{"block_n": bn, "num_warps": w} for bn in (16, 32, 64) for w in (1, 2)],
}


def sweep(model: dict, st: Step) -> tuple[dict[str, list], list[str]]:
    """``lora_expand_tokens``' launch configs per group at ``st.tokens`` tokens, fastest first (the kernel
    alone, 32 layers per graph): ``{group: [(us, cfg), ...]}`` and printable rows."""
    ranked, rows = {}, []
    for name, (k, sizes) in GROUPS.items():
        x = st.input(k)
        ys = [torch.zeros(st.tokens, sum(sizes), device=DEV, dtype=torch.bfloat16) for _ in range(LAYERS)]
        shrunk = F.linear(x, model[name][0][1].reshape(-1, k))
        results = []
        for cfg in SWEEPS["expand-tokens"]:

            def run(cfg=cfg, layers=model[name], ys=ys, sizes=sizes, shrunk=shrunk) -> None:
                for layer in range(LAYERS):
                    lora_expand_tokens(shrunk, layers[layer][2], st.tiles, ys[layer], sizes, RANK, **cfg)
            results.append((graph_us(run, reps=4) / LAYERS, cfg))
        default = results[0][0]
        results.sort(key=lambda r: r[0])
        ranked[name] = results
        second = results[min(1, len(results) - 1)]
        rows.append(f"sweep expand-tokens {name} T={st.tokens}: best {results[0][0]:.2f} us {results[0][1]}, "
                    f"2nd {second[0]:.2f} us {second[1]}, default {default:.2f} us, "
                    f"worst {results[-1][0]:.2f} us")
    return ranked, rows


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
    table = []
    for tokens, st in steps.items():     # rows printed as they come: the most important first
        line = {"T": tokens, "base": graph_us(step_fn(model, st, "base"), reps=3)}
        for variant in VARIANTS:
            line[variant] = graph_us(step_fn(model, st, variant), reps=3)
        if tokens == 1:
            line["kernels"] = {v: kernels_per_step(step_fn(model, st, v)) for v in ("base", "split", "appended")}
        table.append(line)
        print({k: (round(v) if isinstance(v, float) else v) for k, v in line.items()}, flush=True)
    ranked, rows = sweep(model, steps[1])
    for row in rows:
        print(row, flush=True)
    best = {"expand-tokens": {name: results[0][1] for name, results in ranked.items()}}
    table[0]["appended-best"] = graph_us(step_fn(model, steps[1], "appended", best), reps=3)
    print(f"T=1 appended, best expand configs: {table[0]['appended-best']:.0f} us", flush=True)
    print(f"\nbest configs at 1 token: {best}")
    cols = (*VARIANTS, "appended-best")
    print("\n| tokens (8B shapes, 32 layers, 1 CUDA graph) | base us/step | " + " | ".join(f"+{c}" for c in cols)
          + " | kernels base/split/appended |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for ln in table:
        b = ln["base"]
        cells = " | ".join(f"{ln[v]:.0f} ({b / ln[v]:.1%})" if v in ln else "-" for v in cols)
        k = ln.get("kernels")
        kc = "/".join(str(k[v]) for v in ("base", "split", "appended")) if k else "-"
        print(f"| {ln['T']} | {b:.0f} | {cells} | {kc} |")


if __name__ == "__main__":
    main()
