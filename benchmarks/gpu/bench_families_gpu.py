"""Mistral-7B's and Gemma-2-9B's shapes next to Llama-3.1-8B's (bf16, dummy weights, one H200).

latency-1 (1 x 128/256) and throughput-prefill (``--prefill-prompts`` x 1024/128, default 300 of DESIGN.md's
1000 to stay near 3 minutes) for each shape, then each result per active parameter relative to Llama's:
``(tok/s x active params) / (Llama's tok/s x Llama's active params)``; the target is within 5% (>= 0.95).
Latency-1 counts every parameter a decoded token reads (the LM head included); prefill counts the LM head
only at the share of tokens that are sampled (``_shapes.prefill_active``): prompt tokens never reach it.

    python3 benchmarks/gpu/bench_families_gpu.py [--prefill-prompts 1000] [--only latency|prefill] [--shapes S ...]

Each run is its own process (~30 s of start-up each), so both workloads for the three shapes take about 5
minutes; ``--only latency`` (about 2) or ``--only prefill --shapes gemma-2-9b`` runs a part of it.
"""
from __future__ import annotations

import argparse

from _shapes import active_params, bench, prefill_active

SHAPES = ("llama-3.1-8b", "mistral-7b", "gemma-2-9b")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefill-prompts", type=int, default=300)
    parser.add_argument("--only", choices=("latency", "prefill"), help="run one workload (default: both)")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES[1:], default=list(SHAPES[1:]),
                        help="families to run next to Llama (default: both)")
    args = parser.parse_args()
    skipped = {"error": "not run (--only)"}
    rows = {}
    for shape in (SHAPES[0], *args.shapes):
        lat = pre = skipped
        if args.only != "prefill":
            lat = bench("latency", shape, "--batch-size", "1", "--input-len", "128", "--output-len", "256",
                        "--num-iters-warmup", "2", "--num-iters", "3")
        if args.only != "latency":
            # A short run first, so the timed one meets no first-use kernel compiles (they land in Triton's disk
            # cache); on a cold cache they dominated a 100-prompt run (BENCHMARKS.md, third session, call 4).
            bench("throughput", shape, "--num-prompts", "32", "--input-len", "1024", "--output-len", "128")
            pre = bench("throughput", shape, "--num-prompts", str(args.prefill_prompts), "--input-len", "1024",
                        "--output-len", "128")
        params = active_params(shape)
        rows[shape] = (lat, pre, params["active"], prefill_active(params, 1024, 128))
    base_lat, base_pre, base_p, base_pp = rows["llama-3.1-8b"]
    print("== table ==")
    print("FAMILY shape | active params (decode / prefill) | latency-1 out tok/s | per-param vs llama | "
          "prefill total tok/s | per-param vs llama (prefill count; decode count)")
    for shape, (lat, pre, p, pp) in rows.items():
        cells, ratios = [], []
        if "error" in lat or "error" in base_lat:
            cells += [f"({lat.get('error') or 'llama baseline failed'})", "-"]
        else:
            lat_tps = 256 / lat["avg_latency"]
            rl = lat_tps * p / (256 / base_lat["avg_latency"] * base_p)
            cells += [f"{lat_tps:.1f}", f"{rl:.3f}"]
            ratios.append(rl)
        if "error" in pre or "error" in base_pre:
            cells += [f"({pre.get('error') or 'llama baseline failed'})", "-"]
        else:
            pre_tps = pre["tokens_per_second"]
            rp = pre_tps * pp / (base_pre["tokens_per_second"] * base_pp)
            rp_decode_count = pre_tps * p / (base_pre["tokens_per_second"] * base_p)
            cells += [f"{pre_tps:.0f}", f"{rp:.3f}; {rp_decode_count:.3f}"]
            ratios.append(rp)
        ok = "-" if not ratios else ("PASS" if min(ratios) >= 0.95 else "BELOW")
        print(f"FAMILY {shape} | {p / 1e9:.2f} / {pp / 1e9:.2f} B | " + " | ".join(cells) + f" | {ok}")


if __name__ == "__main__":
    main()
