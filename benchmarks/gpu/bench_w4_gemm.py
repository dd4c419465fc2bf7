"""Batched W4A16 at decode-batch sizes (64..1024 rows) on Llama-3.1-8B's projections, one H200: every int4 GEMM
path the engine can pick vs bf16 cuBLAS, each checked against dequantize + matmul in fp32.

Paths per (projection, rows): ``bf16`` (``F.linear`` on a bf16 weight of the same shape), ``table`` (what
``quant_matmul`` dispatches today), ``deq`` (dequantize into a scratch weight + cuBLAS, the large-M fallback),
``wgmma`` (the Gluon cp.async kernel, its bucket's first shape) and ``ws`` (the warp-specialized Gluon
kernel, ``_ws_candidates``: TMA producer + dequant warpgroup, consumer warpgroups issuing wgmma only). The ws
shapes run in child processes with a timeout (a kernel that never finishes cannot hang the run); the table at
the end gives microseconds, the best ws shape and bf16 time / best int4 time. About 2 minutes:

    python3 benchmarks/gpu/bench_w4_gemm.py [--rows 64,256,512,1024] [--budget 75]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from _quant_weights import random_weights
from _timing import graph_us

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down_proj": (14336, 4096)}
TOL = 1e-2
KINDS = ("plain", "persist", "np2")      # the warp-specialized shapes, one child process each


def _name(c) -> str:
    s = f"m{c.block_m}n{c.block_n}s{c.stages}w{c.warps}" + (f"b{c.ws}" + ("" if c.dq else "q0") if c.ws else "")
    s += ("P" if c.persist else "") + ("x2" if c.producers > 1 else "")
    return s + (f"/t{c.target}" if not c.splits else f"/k{c.splits}")


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def _setup(rows: list[int]):
    from aphrodite.kernels import int4_matmul as im
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: random_weights(k, n, gen) for name, (k, n) in SHAPES.items()}
    deq = {name: im.dequantize(ws[0], torch.float32) for name, ws in weights.items()}
    xs = {m: torch.randn(m, 14336, device="cuda", generator=gen, dtype=torch.bfloat16) for m in rows}
    return im, weights, deq, xs


def _run_cfgs(im, x, w4, ref, cfgs, emit, bias: bool = False) -> None:
    """Check then time each launch shape; ``emit(name, us, err)`` or ``emit(name, None, message)``. With
    ``bias`` each shape is also checked with a bias (the epilogue's other branch)."""
    out = torch.empty((x.shape[0], w4.n), dtype=x.dtype, device="cuda")
    b = torch.randn(w4.n, device="cuda", dtype=x.dtype) * ref.abs().max().item() if bias else None
    for c in cfgs:
        if c.w4 and not im.w4_supported(x, w4, c):
            continue
        try:
            out.fill_(float("nan"))
            im._launch(x, w4, None, out, c)
            torch.cuda.synchronize()
            err = _err(out, ref)
            again = out.clone()
            im._launch(x, w4, None, out, c)
            same = torch.equal(out, again)
            if b is not None and err <= TOL:
                im._launch(x, w4, b, out, c)
                err = max(err, _err(out, ref + b.float()))
            if not err <= TOL or not same:
                emit(_name(c), None, f"err {err:.1e} repeatable {same}")
                continue
            emit(_name(c), graph_us(lambda c=c: im._launch(x, w4, None, out, c), reps=20), err)
        except Exception:  # noqa: BLE001 - report and go on
            emit(_name(c), None, traceback.format_exc(limit=3)[-500:])


def _kind(c) -> str:
    return "np2" if c.producers > 1 else "persist" if c.persist else "plain"


def child(rows: list[int], budget: float, kind: str) -> None:
    """The warp-specialized shapes of one kind (``_kind``), one JSON line per result (read by the parent)."""
    im, weights, deq, xs = _setup(rows)
    t0 = time.perf_counter()
    for m in sorted(rows, reverse=True):       # the decode-throughput sizes first if the budget runs out
        for name, (k, _n) in SHAPES.items():
            if time.perf_counter() - t0 > budget:
                return
            x = xs[m][:, :k].contiguous()
            ref = x.float() @ deq[name]

            def emit(cname, us, err, name=name, m=m):
                print(json.dumps({"proj": name, "m": m, "cfg": cname, "us": us, "err": err}), flush=True)
            cfgs = [c for c in im._ws_candidates(im._rows_bucket(m)) if _kind(c) == kind]
            _run_cfgs(im, x, weights[name][0], ref, cfgs, emit, bias=name == "qkv_proj")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,256,512,1024")
    ap.add_argument("--budget", type=float, default=75.0, help="seconds for the ws shapes and for the rest")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        child(rows, args.budget, args.child)
        return
    t0 = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    # The warp-specialized shapes first, in two children with a timeout (a kernel that hangs or faults loses
    # only its own child's results).
    ws: dict[tuple[str, int], list[tuple[float, str, float]]] = {}
    fails = []
    lines = []
    for kind, share in zip(KINDS, (0.6, 0.4, 0.3)):
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", kind, "--rows", args.rows, "--budget",
                                   str(args.budget * share * 0.7)], capture_output=True, text=True,
                                  timeout=args.budget * share)
            lines += proc.stdout.splitlines()
            if proc.returncode:
                print(f"ws {kind} child failed: " + proc.stderr[-1500:], flush=True)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            lines += out.splitlines()
            print(f"ws {kind} child: TIMEOUT after {args.budget * share:.0f} s (a kernel hung?)", flush=True)
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r["us"] is None:
            fails.append(f"FAIL ws {r['proj']} M={r['m']} {r['cfg']}: {r['err']}")
        else:
            ws.setdefault((r["proj"], r["m"]), []).append((r["us"], r["cfg"], r["err"]))
    for f in fails:
        print(f, flush=True)
    print(f"ws shapes done ({time.perf_counter() - t0:.0f} s, {len(fails)} failures)", flush=True)

    im, weights, deq, xs = _setup(rows)
    summary = []
    t1 = time.perf_counter()
    for m in sorted(rows, reverse=True):
        for name, (k, _n) in SHAPES.items():
            if time.perf_counter() - t1 > args.budget:
                print(f"{name} M={m}: skipped (budget)", flush=True)
                continue
            w4, _, wf = weights[name]
            x = xs[m][:, :k].contiguous()
            ref = x.float() @ deq[name]
            tb = graph_us(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf), reps=20)
            et = _err(im.quant_matmul(x, w4), ref)
            tt = graph_us(lambda x=x, w=w4: im.quant_matmul(x, w), reps=20) if et <= TOL else float("nan")
            if et > TOL:
                fails.append(f"FAIL table {name} M={m} err {et:.1e}")
            deq_cfg = im.Config(dequant=True)
            res_d = []
            _run_cfgs(im, x, w4, ref, [deq_cfg], lambda c, us, e, res_d=res_d: res_d.append((us, e)))
            td = res_d[0][0] if res_d and res_d[0][0] is not None else float("nan")
            res_w = []

            def emit_w(cname, us, e, name=name, m=m, res_w=res_w):
                if us is None:
                    fails.append(f"FAIL wgmma {name} M={m} {cname}: {e}")
                else:
                    res_w.append((us, cname, e))
            _run_cfgs(im, x, w4, ref, im._wgmma_candidates(im._rows_bucket(m))[:1], emit_w)
            res_w.sort()
            wsr = sorted(ws.get((name, m), []))
            print(f"{name:9s} M={m:4d} bf16 {tb:7.1f} table {tt:7.1f} deq {td:7.1f} | wgmma "
                  + " ".join(f"{c}:{t:.1f}" for t, c, _ in res_w) + " | ws "
                  + " ".join(f"{c}:{t:.1f}" for t, c, _ in wsr), flush=True)
            tw = res_w[0][0] if res_w else float("nan")
            tws, cws = (wsr[0][0], wsr[0][1]) if wsr else (float("nan"), "-")
            summary.append((name, m, tb, tt, td, tw, tws, cws))
    for f in fails:
        if not f.startswith("FAIL ws"):
            print(f, flush=True)
    print(f"\n== W4A16 GEMM vs bf16 ({time.perf_counter() - t0:.0f} s, {len(fails)} failures): us per call; "
          "x = bf16 / best int4 ==")
    print(f"{'proj':9s} {'M':>5s} {'bf16':>7s} {'table':>7s} {'deq':>7s} {'wgmma':>7s} {'ws':>7s} {'x':>5s}  ws shape")
    for name, m, tb, tt, td, tw, tws, cws in summary:
        best = min((v for v in (tt, td, tw, tws) if v == v), default=float("nan"))
        print(f"{name:9s} {m:5d} {tb:7.1f} {tt:7.1f} {td:7.1f} {tw:7.1f} {tws:7.1f} {tb / best:5.2f}  {cws}")


if __name__ == "__main__":
    main()
