"""GGUF (Q4_K_M-like) on one H200: kernel correctness at real sizes, kernel bandwidth, engine runs.

    python3 benchmarks/gpu/bench_gguf_gpu.py            # ~3 minutes
    python3 benchmarks/gpu/bench_gguf_gpu.py --full     # throughput-decode with 1000 prompts
    python3 benchmarks/gpu/bench_gguf_gpu.py --check-only   # correctness of the K-quant paths, < 2 minutes

1. Every block type, Llama-3.1-8B layer shapes: the Triton kernels (GEMV for 1-8 rows, tiled GEMM
   for more) against ``dequantize_reference`` followed by a float64 matmul.
2. Batch 1, per projection of the 8B shape: the GEMV's effective GB/s of blocks (weights rotated
   through more copies than L2 holds), best of a small sweep of launch configurations.
3. One decode step's worth of Q4_K_M-like matmuls (per layer q/k Q4_K, v Q6_K, o/gate/up Q4_K,
   down Q6_K, LM head Q6_K) at M = 1, 8, 64, 256 in a CUDA graph: time and GB/s of blocks; at 64
   and 256 the large-batch paths (dequantize + cuBLAS; decoded K-quant tiles into tl.dot; the generic
   tiled GEMM) and bf16 cuBLAS.
4. ``aphrodite bench latency`` (1 x 128/256) and ``bench throughput`` (128/1024 decode) on the
   Llama-3.1-8B shape with dummy GGUF blocks (``--load-format dummy --quantization gguf``) and the
   bf16 run of the same session, each with its weight footprint. A results table comes last.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from aphrodite.kernels import gguf_gpu  # noqa: E402
from aphrodite.kernels.gguf_matmul import (  # noqa: E402
    GGML_BLOCKS,
    GGML_TYPE_NAMES,
    dequantize_reference,
    gguf_linear,
    q8_activations,
    random_blocks,
)

HIDDEN, INTER, VOCAB, LAYERS, Q, KV = 4096, 14336, 128256, 32, 4096, 1024
Q4_K, Q6_K = 12, 14


def check_kernels(rows: list[tuple[str, str]]) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for qtype in GGML_BLOCKS:
        worst = 0.0
        for n, k in ((HIDDEN, HIDDEN), (HIDDEN, INTER)):
            w = random_blocks(qtype, n, k, scale=1e-3, device=dev, generator=g)
            ref_w = dequantize_reference(w, qtype, k, torch.float64)
            for m in (1, 4, 16, 64, 300):
                x = torch.randn(m, k, device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16)
                try:
                    out = gguf_linear(x, w, qtype).double()
                except Exception as e:  # report and keep going: the rest of the table still matters
                    print(f"  {GGML_TYPE_NAMES[qtype]} M={m}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    worst = float("inf")
                    continue
                ref = x.double() @ ref_w.T
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                worst = max(worst, err)
            del ref_w
        ok = worst < 2e-2   # bf16 output and bf16 tensor-core inputs in the GEMM
        verdict = "OK" if ok else "FAIL"
        rows.append((f"kernel {GGML_TYPE_NAMES[qtype]} max rel err (M=1..300)", f"{worst:.2e} {verdict}"))
        print(rows[-1], flush=True)
    torch.cuda.empty_cache()


def check_only(deadline_s: float = 120.0, dev: torch.device | None = None) -> bool:
    """The K-quant kernels (Q4_K, Q5_K, Q6_K) at 8B layer sizes against a float64 dequantize+matmul,
    each path the dispatch can pick plus the linear method's fused-layer and embedding uses; one
    PASS/FAIL line per case. Returns True when every case ran and passed."""
    from aphrodite.kernels import gguf_matmul

    dev = dev or torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    t0 = time.time()
    results: list[tuple[str, str]] = []

    def case(label: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        verdict = "PASS" if err < tol else "FAIL"
        results.append((label, f"{verdict} rel err {err:.1e} (tol {tol:.0e})"))
        print(f"{label:<58} {results[-1][1]}", flush=True)

    weights = {}
    for qtype in (Q4_K, 13, Q6_K):
        for n, k in ((HIDDEN, HIDDEN), (HIDDEN, INTER)):
            w = random_blocks(qtype, n, k, scale=1e-3, device=dev, generator=g)
            weights[(qtype, k)] = (w, dequantize_reference(w, qtype, k, torch.float64))
    for qtype in (Q4_K, 13, Q6_K):
        name = GGML_TYPE_NAMES[qtype]
        for k in (HIDDEN, INTER):   # batch 1, default dispatch (8-bit activations) and exact
            w, ref_w = weights[(qtype, k)]
            x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
            ref = x.double() @ ref_w.T
            case(f"{name} {HIDDEN}x{k} M=1 default (q8 activations)", gguf_linear(x, w, qtype), ref, 3e-2)
            out = torch.empty(1, HIDDEN, device=dev, dtype=torch.bfloat16)
            case(f"{name} {HIDDEN}x{k} M=1 exact gemv", gguf_gpu.gemv(x, w, qtype, out), ref, 1e-2)
        w, ref_w = weights[(qtype, HIDDEN)]
        for m, label in ((3, "q8 v2 rows"), (4, "dot split-K"), (16, "dot"), (8, "dequant"), (300, "dequant+cuBLAS")):
            if time.time() - t0 > deadline_s:
                results.append((f"{name} M={m}", "SKIPPED (time)"))
                continue
            x = torch.randn(m, HIDDEN, device=dev, generator=g).to(torch.bfloat16)
            ref = x.double() @ ref_w.T
            if label.startswith("dot"):
                out = torch.empty(m, HIDDEN, device=dev, dtype=torch.bfloat16)
                case(f"{name} {HIDDEN}x{HIDDEN} M={m} {label}", gguf_gpu.dot(x, w, qtype, out), ref, 2e-2)
                continue
            # bf16 weights into the tensor cores and a bf16 output: the generic GEMM's bound of the old bench
            case(f"{name} {HIDDEN}x{HIDDEN} M={m} default ({label})", gguf_linear(x, w, qtype), ref,
                 3e-2 if "q8" in label else 2e-2)
        rows_idx = torch.tensor([5, 0, HIDDEN - 1, 5], device=dev)   # embedding lookups
        case(f"{name} embedding rows (dequantize kernel)", gguf_matmul.dequantize(w[rows_idx], qtype, HIDDEN,
                                                                                  torch.float32), ref_w[rows_idx], 1e-6)
    # a fused layer mixing types (q/k Q4_K + v Q6_K): one rounding of the activations, column slices
    x = torch.randn(1, HIDDEN, device=dev, generator=g).to(torch.bfloat16)
    xq = gguf_matmul.q8_activations(x)
    fused = torch.empty(1, 2 * HIDDEN, device=dev, dtype=torch.bfloat16)
    (wa, ra), (wb, rb) = weights[(Q4_K, HIDDEN)], weights[(Q6_K, HIDDEN)]
    gguf_linear(x, wa, Q4_K, out=fused[:, :HIDDEN], xq=xq)
    gguf_linear(x, wb, Q6_K, out=fused[:, HIDDEN:], xq=xq)
    case("fused Q4_K|Q6_K M=1, shared q8 activations", fused, x.double() @ torch.cat([ra, rb]).T, 3e-2)
    ok = all(v.startswith("PASS") for _, v in results)
    print(f"\n== GGUF GPU check: {'ALL PASS' if ok else 'FAILURES'} ({time.time() - t0:.0f}s) ==")
    width = max(len(k) for k, _ in results)
    for k, v in results:
        print(f"{k:<{width}}  {v}")
    return ok


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of ``fn`` replayed in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


PROJECTIONS = (("qk_proj Q4_K", Q + KV - KV, HIDDEN, Q4_K), ("v_proj Q6_K", KV, HIDDEN, Q6_K),
               ("o_proj Q4_K", HIDDEN, Q, Q4_K), ("gate_up Q4_K", 2 * INTER, HIDDEN, Q4_K),
               ("down Q4_K", HIDDEN, INTER, Q4_K), ("down Q6_K", HIDDEN, INTER, Q6_K),
               ("lm_head Q6_K", VOCAB, HIDDEN, Q6_K))
GEMV_CONFIGS = ((2, 4, 2), (4, 4, 4), (2, 8, 4), (8, 2, 4))
Q8_CONFIGS = ((2, 8, 2), (1, 8, 2), (4, 8, 4), (16, 4, 8), (8, 8, 8), (1, 4, 1), (2, 8, 4), (4, 4, 2))


def bench_projections(rows: list[tuple[str, str]]) -> dict[str, bool]:
    """Batch-1 GEMV per projection: GB/s of blocks for each launch configuration (exact float kernel
    and the 8-bit-activation one), best kept. Returns whether each kernel was correct everywhere."""
    dev = torch.device("cuda")
    totals: dict[tuple[str, int], dict[tuple[int, int, int], float]] = {}
    ok = {"exact": True, "q8": True}
    best_entries: dict[tuple[str, int, int, int], tuple[int, int, int]] = {}
    for name, n, k, qtype in PROJECTIONS:
        one = n * GGML_BLOCKS[qtype][1] * k // GGML_BLOCKS[qtype][0]
        copies = max(1, -(-400 * 2**20 // one))   # more than L2 holds
        ws = [random_blocks(qtype, n, k, device=dev) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        ref = (x.double() @ dequantize_reference(ws[0], qtype, k, torch.float64).T)
        for kind, configs in (("exact", GEMV_CONFIGS), ("q8", Q8_CONFIGS)):
            fn = gguf_gpu.gemv if kind == "exact" else gguf_gpu.gemv_q8
            results = []
            for cfg in configs:
                try:
                    fn(x, ws[0], qtype, out, config=cfg)
                    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                    dt = graph_time(lambda cfg=cfg, x=x, ws=ws, qtype=qtype, out=out, fn=fn:
                                    [fn(x, w, qtype, out, config=cfg) for w in ws]) / copies
                except Exception as e:  # a configuration the compiler refuses: report, keep going
                    print(f"  {name} {kind} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                ok[kind] &= err < (2e-2 if kind == "q8" else 4e-3)
                gbs = one / dt / 1e9
                table = totals.setdefault((kind, qtype), {})
                table[cfg] = table.get(cfg, 0.0) + dt * (32 if "lm_head" not in name else 1)
                results.append((gbs, cfg, dt, err))
                print(f"  {name} {kind} cfg={cfg}: {dt * 1e6:.1f} us {gbs:.0f} GB/s err {err:.1e}", flush=True)
            ok[kind] &= any(r[1] == gguf_gpu.GEMV_DEFAULT[kind] for r in results)   # the engine's choice ran
            if results:
                base = next((r for r in results if r[1] == configs[0]), results[0])
                top = max(results)
                best_entries[(kind, qtype, n, k)] = top[1]
                rows.append((f"M=1 {kind} {name} {n}x{k}", f"first cfg {base[0]:.0f} GB/s ({base[2] * 1e6:.1f} us); "
                             f"best {top[0]:.0f} GB/s ({top[2] * 1e6:.1f} us) cfg={top[1]}; err {top[3]:.1e}"))
                print(rows[-1], flush=True)
        del ws
    for (kind, qtype), table in totals.items():
        cfg = min(table, key=table.get)
        rows.append((f"M=1 {kind} best overall cfg {GGML_TYPE_NAMES[qtype]}", f"{cfg}"))
    rows.append(("GEMV_CONFIGS", repr(best_entries)))
    torch.cuda.empty_cache()
    return ok


V2_CONFIGS = ((4, 8, 4), (2, 8, 2), (4, 16, 4), (2, 16, 4), (1, 8, 1), (2, 4, 2))


def bench_m1_table(rows: list[tuple[str, str]]) -> None:
    """Batch 1, per projection of the 8B shape: the 8-bit GEMV v1 (its default) against v2 in a few
    launch configurations, weights rotated through more copies than L2 holds; us, GB/s of blocks and
    the error against the float64 product. One line per projection."""
    dev = torch.device("cuda")
    for name, n, k, qtype in PROJECTIONS:
        one = n * GGML_BLOCKS[qtype][1] * k // GGML_BLOCKS[qtype][0]
        copies = max(1, -(-400 * 2**20 // one))
        ws = [random_blocks(qtype, n, k, device=dev) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        xq = gguf_gpu.quantize_activations(x)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ dequantize_reference(ws[0], qtype, k, torch.float64).T
        res = []
        for impl, cfgs in (("v1", (None,)), ("v2", V2_CONFIGS)):
            gguf_gpu.GEMV_Q8_IMPL = impl
            for cfg in cfgs:
                try:
                    gguf_gpu.gemv_q8(x, ws[0], qtype, out, config=cfg, xq=xq)
                    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
                    dt = graph_time(lambda cfg=cfg, ws=ws, out=out, xq=xq, x=x, qtype=qtype:
                                    [gguf_gpu.gemv_q8(x, w, qtype, out, config=cfg, xq=xq) for w in ws]) / copies
                except Exception as e:  # a configuration the compiler refuses: report, keep going
                    res.append(f"{impl}{cfg or ''} {type(e).__name__}")
                    print(f"  {name} {impl} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                bad = "" if err < 3e-2 else " BAD"
                res.append(f"{impl}{cfg or ''} {dt * 1e6:.1f}us {one / dt / 1e9:.0f}GB/s{bad}")
        gguf_gpu.GEMV_Q8_IMPL = "v2"
        dq = graph_time(lambda x=x: gguf_gpu.quantize_activations(x), reps=50)
        res.append(f"quantize x {dq * 1e6:.1f}us")
        rows.append((f"M=1 {name} {n}x{k}", "; ".join(res)))
        print(rows[-1], flush=True)
        del ws
    torch.cuda.empty_cache()


TILED_CONFIGS = ((128, 64, 8, 2), (128, 128, 8, 2), (256, 64, 8, 1), (64, 64, 4, 3), (128, 64, 8, 3),
                 (64, 128, 4, 2))


def bench_tiled(rows: list[tuple[str, str]]) -> None:
    """M=256 (batched decode): the tiled kernel's configurations on gate_up (Q4_K) and down (Q6_K)."""
    dev = torch.device("cuda")
    for name, n, k, qtype in (PROJECTIONS[3], PROJECTIONS[5]):
        w = random_blocks(qtype, n, k, device=dev)
        x = torch.randn(256, k, device=dev, dtype=torch.bfloat16)
        dense = dequantize_reference(w, qtype, k, torch.bfloat16)
        t_dense = graph_time(lambda x=x, dense=dense: x @ dense.T)
        t_deq = graph_time(lambda x=x, w=w, qtype=qtype: gguf_gpu.dequant_matmul(x, w, qtype, None))
        res = [f"bf16 {t_dense * 1e6:.0f} us", f"dequant {t_deq * 1e6:.0f} us"]
        for cfg in TILED_CONFIGS:
            try:
                t = graph_time(lambda x=x, w=w, qtype=qtype, cfg=cfg: gguf_gpu.tiled_matmul(x, w, qtype, None, cfg))
                res.append(f"{cfg} {t * 1e6:.0f}")
            except Exception as e:  # a configuration the GPU refuses (shared memory): report, keep going
                res.append(f"{cfg} {type(e).__name__}")
        rows.append((f"M=256 {name} {n}x{k}", "; ".join(res)))
        print(rows[-1], flush=True)
        del w, dense
    torch.cuda.empty_cache()


def layer_weights(dev: torch.device) -> list[tuple[torch.Tensor, int, int]]:
    out = []
    for i in range(LAYERS):
        more = i % 2 == 0
        for n, k, qtype in ((Q + KV, HIDDEN, Q4_K), (KV, HIDDEN, Q6_K if more else Q4_K), (HIDDEN, Q, Q4_K),
                            (2 * INTER, HIDDEN, Q4_K), (HIDDEN, INTER, Q6_K if more else Q4_K)):
            out.append((random_blocks(qtype, n, k, device=dev), qtype, k))
    out.append((random_blocks(Q6_K, VOCAB, HIDDEN, device=dev), Q6_K, HIDDEN))
    return out


def bench_decode_matmuls(rows: list[tuple[str, str]]) -> None:
    dev = torch.device("cuda")
    ws = layer_weights(dev)
    total = sum(w.numel() for w, _, _ in ws)
    scratch, dot_rows, large = gguf_gpu.SCRATCH_VALUES, gguf_gpu.DOT_MAX_ROWS, gguf_gpu.LARGE_BATCH
    q8_rows = gguf_gpu.Q8_MAX_ROWS
    for m in (1, 4, 8, 16, 64, 256):
        xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        paths = (("dequant", "dequant 64M scratch", "generic") if m > 16 else
                 ("q8 v2", "q8 v2 x rounded once", "q8 v1", "exact") if m == 1 else ("q8 v2 rows", "dot", "dequant"))
        for path in paths:
            gguf_gpu.DOT_MAX_ROWS = dot_rows
            if path.startswith(("dequant", "tiled", "generic")):
                gguf_gpu.LARGE_BATCH = path.split()[0]
            if path == "dequant":
                gguf_gpu.DOT_MAX_ROWS = 0
            if path == "dot":
                gguf_gpu.DOT_MAX_ROWS = 16
            gguf_gpu.SCRATCH_VALUES = 64 * 2**20 if "64M" in path else scratch
            gguf_gpu.Q8_ACTIVATIONS = path.startswith("q8")
            gguf_gpu.Q8_MAX_ROWS = 16 if path == "q8 v2 rows" else q8_rows
            gguf_gpu.GEMV_Q8_IMPL = "v1" if path == "q8 v1" else "v2"
            once = "once" in path   # one rounding per distinct input (the engine: one per layer input)

            def step(ws=ws, xs=xs, once=once):
                xq = {k: q8_activations(x) for k, x in xs.items()} if once else {}
                for w, qtype, k in ws:
                    gguf_linear(xs[k], w, qtype, xq=xq.get(k))
            try:
                dt = graph_time(step, reps=10)
            except Exception as e:  # report and keep going
                rows.append((f"Q4_K_M matmuls of one 8B step, M={m} {path}",
                             f"FAILED {type(e).__name__}: {str(e)[:200]}"))
                print(rows[-1], flush=True)
                continue
            rows.append((f"Q4_K_M matmuls of one 8B step, M={m} {path}".rstrip(),
                         f"{dt * 1e3:.2f} ms, {total / dt / 1e9:.0f} GB/s of blocks, {total / 2**30:.2f} GiB"))
            print(rows[-1], flush=True)
        gguf_gpu.DOT_MAX_ROWS = dot_rows
        gguf_gpu.LARGE_BATCH = large
        gguf_gpu.Q8_ACTIVATIONS = True
        gguf_gpu.GEMV_Q8_IMPL = "v2"
        gguf_gpu.SCRATCH_VALUES = scratch
        gguf_gpu.Q8_MAX_ROWS = q8_rows
    ws.clear()
    torch.cuda.empty_cache()
    # bf16 reference: the same step's matmuls as dense cuBLAS (one layer's weights reused; 32x the time)
    dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.01
             for n, k in ((Q + 2 * KV, HIDDEN), (HIDDEN, Q), (2 * INTER, HIDDEN), (HIDDEN, INTER))]
    head = torch.randn(VOCAB, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.01
    for m in (1, 64, 256):
        xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
        t_layer = graph_time(lambda xs=xs, dense=dense: [xs[w.shape[1]] @ w.T for w in dense], reps=10)
        t_head = graph_time(lambda xs=xs, head=head: xs[HIDDEN] @ head.T, reps=10)
        rows.append((f"bf16 cuBLAS matmuls of one 8B step, M={m}", f"{(LAYERS * t_layer + t_head) * 1e3:.2f} ms "
                     "(L2-warm per layer)"))
        print(rows[-1], flush=True)
    del dense, head
    torch.cuda.empty_cache()


def run_cli(args: list[str], rows: list[tuple[str, str]], label: str) -> None:
    cmd = [sys.executable, "-m", "aphrodite.endpoints.cli", "bench", *args]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        rows.append((label, f"FAILED rc={proc.returncode}: {text.strip().splitlines()[-1:]}"))
        print(text[-3000:], flush=True)
        return
    keep = [ln for ln in text.splitlines()
            if re.search(r"Throughput|Output token|Time per output|Avg latency|[Mm]emory|weights|KV", ln)]
    for ln in keep[-6:]:
        print(f"  [{label}] {ln}", flush=True)
    summary = next((ln for ln in keep if "Output token throughput" in ln or ln.startswith("Throughput")), "")
    rows.append((label, f"{summary.strip()}  ({time.time() - t:.0f}s)"))


def weight_footprint(quantization: str | None) -> float:
    """GiB of parameters of the 8B shape built on the GPU with dummy weights."""
    import tempfile

    from aphrodite.benchmarks.model_shapes import write_model_shape
    from aphrodite.config import create_engine_config
    from aphrodite.engine_args import EngineArgs
    from aphrodite.modeling.loader import load_model
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_model_shape("llama-3.1-8b", tmp))
        cfg = create_engine_config(EngineArgs(model=path, load_format="dummy", quantization=quantization,
                                              dtype="bfloat16", skip_tokenizer_init=True, max_model_len=2048))
        model = load_model(cfg.model, torch.device("cuda"))
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        del model
        torch.cuda.empty_cache()
        return size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="throughput-decode with 1000 prompts")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness pass over all types")
    parser.add_argument("--check-only", action="store_true",
                        help="only the K-quant kernels vs a float64 reference at real sizes (under 2 minutes)")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the per-projection GEMV sweep")
    parser.add_argument("--m1-table", action="store_true", help="batch-1 GEMV v1 vs v2 per projection (~1 min)")
    parser.add_argument("--skip-steps", action="store_true", help="skip the decode-step matmul timings")
    parser.add_argument("--latency-only", action="store_true", help="engine: latency-1 only (no throughput)")
    parser.add_argument("--throughput-only", action="store_true", help="engine: throughput-decode only")
    parser.add_argument("--no-bf16", action="store_true", help="engine: the GGUF runs only (no bf16 baseline)")
    opts = parser.parse_args()
    if opts.check_only:
        sys.exit(0 if check_only() else 1)
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name())]
    t0 = time.time()
    if not opts.skip_check:
        check_kernels(rows)
        print(f"[{time.time() - t0:.0f}s] checks done", flush=True)
    ok = {"q8": True}
    if not opts.skip_sweep:
        ok = bench_projections(rows)
        print(f"[{time.time() - t0:.0f}s] GEMV sweep done", flush=True)
    if not ok["q8"]:   # the engine runs then keep exact activations
        os.environ["APHRODITE_GGUF_GPU_Q8_ACTIVATIONS"] = "0"
        gguf_gpu.Q8_ACTIVATIONS = False
        rows.append(("engine runs", "8-bit-activation GEMV failed above: exact GEMV"))
    if opts.m1_table:
        bench_m1_table(rows)
        print(f"[{time.time() - t0:.0f}s] M=1 table done", flush=True)
    if not opts.skip_sweep:
        bench_tiled(rows)
    if not opts.skip_steps:
        bench_decode_matmuls(rows)
        print(f"[{time.time() - t0:.0f}s] step times done", flush=True)
    quants = ("gguf",) if opts.no_bf16 else ("gguf", None)
    if not (opts.skip_engine or opts.latency_only or opts.throughput_only):
        for quant in quants:
            rows.append((f"weights GiB ({quant or 'bf16'})", f"{weight_footprint(quant):.2f}"))
    if not opts.skip_engine:
        shape = ["--model-shape", "llama-3.1-8b", "--load-format", "dummy", "--dtype", "bfloat16"]
        n = "1000" if opts.full else "200"
        for quant in quants:
            q = ["--quantization", quant] if quant else []
            name = "Q4_K_M gguf" if quant else "bf16"
            if not opts.throughput_only:
                run_cli(["latency", *shape, *q, "--batch-size", "1", "--input-len", "128", "--output-len", "256",
                         "--num-iters-warmup", "1", "--num-iters", "3"], rows, f"latency-1 {name}")
            if not opts.latency_only:
                run_cli(["throughput", *shape, *q, "--num-prompts", n, "--input-len", "128", "--output-len", "1024"],
                        rows, f"throughput-decode {n}x128/1024 {name}")
    print("\n== GGUF on the GPU ==")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
