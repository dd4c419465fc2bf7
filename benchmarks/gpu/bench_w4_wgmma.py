"""The Gluon W4A16 kernel (``aphrodite/kernels/w4_wgmma.py``, Hopper wgmma with an explicit cp.async ring)
vs bf16 cuBLAS and vs what the engine dispatches today (``quant_matmul``'s table: the Triton W4A16 kernel up
to 256 rows, dequantize + cuBLAS above), on Llama-3.1-8B's four projections with dummy AWQ-style weights
(group 128, zero points).

Every launch shape of ``_wgmma_candidates`` is checked against dequantize + matmul in fp32 (max |err| /
max |ref| < 1e-2, else FAIL) and timed from a CUDA graph; the table at the end gives, per projection and
rows, bf16 / table / the best wgmma shape in microseconds and bf16 time / wgmma time. Under 3 minutes:

    python3 benchmarks/gpu/bench_w4_wgmma.py [--rows 16,64,128,256,512,1024] [--budget 150]
    python3 benchmarks/gpu/bench_w4_wgmma.py --gemv       # the Gluon int4/FP8 GEMVs (1, 2, 4 rows) instead
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from _quant_weights import random_weights
from _timing import graph_us

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down_proj": (14336, 4096)}


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def _name(c) -> str:
    return (f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.stages}w{c.warps}"
            + (f"/t{c.target}" if not c.splits else f"/k{c.splits}"))


def gemv(budget: float) -> None:
    """``--gemv``: the Gluon GEMVs (``gemv_gluon``, cp.async rings; int4 and FP8 per-channel) at 1, 2 and 4 rows
    vs the Triton GEMV the engine runs today and bf16, every shape of ``gluon_gemv_candidates`` checked and
    timed."""
    from aphrodite.kernels import int4_matmul as im
    from aphrodite.kernels import quant_gemv as qg
    t0 = time.perf_counter()
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: random_weights(k, n, gen) for name, (k, n) in SHAPES.items()}
    summary, fails = [], 0
    for m in (1, 2, 4):
        for name, (k, _n) in SHAPES.items():
            if time.perf_counter() - t0 > budget:
                print(f"{name} M={m}: skipped (budget {budget:.0f} s)", flush=True)
                continue
            w4, w8, wf = weights[name]
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            tb = graph_us(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf))
            for fmt, wq in (("int4", w4), ("fp8", w8)):
                nbytes = sum(t.numel() * t.element_size() for t in wq.tensors())
                ref = x.float() @ im.dequantize(wq, torch.float32)
                tt = graph_us(lambda x=x, w=wq: qg.quant_gemv(x, w))
                et = _err(qg.quant_gemv(x, wq), ref)
                res = []
                for c in qg.gluon_gemv_candidates(wq.fmt):
                    if not qg.gluon_gemv_ok(x, wq, c):
                        continue
                    cname = (f"k{c.block_k}w{c.warps}t{c.target}s{c.stages}" if fmt == "int4"
                             else f"n{c.block}w{c.warps}s{c.stages}")
                    try:
                        got = qg.quant_gemv(x, wq, config=c)
                        err = _err(got, ref)
                        same = torch.equal(got, qg.quant_gemv(x, wq, config=c))
                        if err > 1e-2 or not same or not torch.isfinite(got).all():
                            fails += 1
                            print(f"FAIL gemv {fmt} {name} M={m} {cname} err {err:.1e} repeatable {same}", flush=True)
                            continue
                        res.append((graph_us(lambda c=c, x=x, w=wq: qg.quant_gemv(x, w, config=c)), cname, err))
                    except Exception:  # noqa: BLE001
                        fails += 1
                        print(f"FAIL gemv {fmt} {name} M={m} {cname}: " + traceback.format_exc(limit=4)[-600:],
                              flush=True)
                res.sort()
                print(f"{name:9s} {fmt:4s} M={m} bf16 {tb:6.1f} triton {tt:6.1f} (err {et:.1e}) | gluon "
                      + "  ".join(f"{c}:{t:.1f}" for t, c, _ in res), flush=True)
                best = res[0] if res else (float("nan"), "-", float("nan"))
                summary.append((name, fmt, m, tb, tt, best[0], best[1], nbytes))
    print(f"\n== GEMV ({time.perf_counter() - t0:.0f} s, {fails} failures): us per call; GB/s of weight bytes")
    print(f"{'proj':9s} {'fmt':4s} {'M':>2s} {'bf16':>6s} {'triton':>6s} {'GB/s':>5s} {'gluon':>6s} {'GB/s':>5s}  best")
    for name, fmt, m, tb, tt, tg, cname, nb in summary:
        print(f"{name:9s} {fmt:4s} {m:2d} {tb:6.1f} {tt:6.1f} {nb / tt / 1e3:5.0f} {tg:6.1f} {nb / tg / 1e3:5.0f}  "
              f"{cname}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,64,128,200,256,512,1024,2048")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which remaining rows are skipped")
    ap.add_argument("--gemv", action="store_true", help="the Gluon int4 / FP8 GEMVs at 1, 2, 4 rows instead")
    args = ap.parse_args()
    if args.gemv:
        gemv(args.budget)
        return
    from aphrodite.kernels import int4_matmul as im
    from aphrodite.kernels.w4_wgmma import wgmma_supported
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"wgmma kernel supported: {wgmma_supported(torch.device('cuda'))}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: random_weights(k, n, gen) for name, (k, n) in SHAPES.items()}
    deq = {name: im.dequantize(ws[0], torch.float32) for name, ws in weights.items()}
    summary = []
    fails = 0
    for m in (int(r) for r in args.rows.split(",")):
        for name, (k, n) in SHAPES.items():
            if time.perf_counter() - t0 > args.budget:
                print(f"{name} M={m}: skipped (budget {args.budget:.0f} s)", flush=True)
                continue
            w4, _, wf = weights[name]
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            ref = x.float() @ deq[name]
            out = torch.empty((m, n), dtype=x.dtype, device="cuda")
            tb = graph_us(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf), reps=20)
            tt = graph_us(lambda x=x, w=w4: im.quant_matmul(x, w), reps=20)
            et = _err(im.quant_matmul(x, w4), ref)
            res = []
            for c in im._wgmma_candidates(im._rows_bucket(m)):
                if not im.w4_supported(x, w4, c):
                    continue
                try:
                    out.zero_()
                    im._launch(x, w4, None, out, c)
                    err = _err(out, ref)
                    again = out.clone()
                    im._launch(x, w4, None, out, c)
                    if err > 1e-2 or not torch.isfinite(out).all() or not torch.equal(out, again):
                        fails += 1
                        print(f"FAIL {name} M={m} {_name(c)} err {err:.1e} repeatable {torch.equal(out, again)}",
                              flush=True)
                        continue
                    us = graph_us(lambda c=c, x=x, out=out, w4=w4: im._launch(x, w4, None, out, c), reps=20)
                    res.append((us, c, err))
                except Exception:  # noqa: BLE001 - report and go on
                    fails += 1
                    print(f"FAIL {name} M={m} {_name(c)}: " + traceback.format_exc(limit=4)[-600:], flush=True)
            res.sort(key=lambda r: r[0])
            line = "  ".join(f"{_name(c)}:{t:.1f}" for t, c, _ in res)
            print(f"{name:9s} M={m:4d} bf16 {tb:7.1f} table {tt:7.1f} (err {et:.1e}) | wgmma {line}", flush=True)
            if res:
                summary.append((name, m, tb, tt, res[0][0], _name(res[0][1]), res[0][2]))
            else:
                summary.append((name, m, tb, tt, float("nan"), "-", float("nan")))
    print(f"\n== summary ({time.perf_counter() - t0:.0f} s, {fails} failures): us per call; "
          "x = bf16 time / that kernel's time ==")
    print(f"{'proj':9s} {'M':>5s} {'bf16':>7s} {'table':>7s} {'x':>5s} {'wgmma':>7s} {'x':>5s}  best shape (err)")
    for name, m, tb, tt, tw, cname, err in summary:
        print(f"{name:9s} {m:5d} {tb:7.1f} {tt:7.1f} {tb / tt:5.2f} {tw:7.1f} {tb / tw:5.2f}  {cname} ({err:.0e})")


if __name__ == "__main__":
    main()
