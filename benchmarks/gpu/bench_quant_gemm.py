"""Batched quantized GEMMs on one H200: Llama-3.1-8B's four projections at M = 1, 16, 64, 128, 256, 1024 rows,
bf16 ``F.linear`` (cuBLAS) vs int4 W4A16 (group 128, asymmetric like AutoAWQ; ``quant_matmul`` as the engine
calls it: the GEMV at M <= 4, the batched W4A16 kernel above) vs FP8 (per-channel weights, the path
``Fp8LinearMethod.apply`` takes: weight-only kernel at M <= 16, else the per-token quantizer + the faster
of ``torch._scaled_mm`` and the Triton W8A8 kernel). Dummy weights.

Every row: max |err| / max |ref| against dequantize + matmul in fp32 (int4, fp8 weight-only) or the
fp8-quantized activations' product (W8A8), and microseconds per call (a CUDA graph of 50 calls). Then a
sweep of the W4A16 kernel's launch shapes (``_w4_candidates``) at 16..1024 rows, so the table of shapes
can be tuned from the results, and the summary table last. Runs in about two minutes:

    python3 benchmarks/gpu/bench_quant_gemm.py [--no-sweep] [--old]
    python3 benchmarks/gpu/bench_quant_gemm.py --check-only     # PASS/FAIL per kernel path, < 60 s
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl
from _quant_weights import random_weights
from _timing import graph_us

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down_proj": (14336, 4096)}
ROWS = (1, 16, 64, 128, 256, 1024)
SWEEP_ROWS = (16, 64, 128, 256, 1024)


def _explore():
    """Shapes outside the tuner's table, timed in the sweep at 64+ rows to find better ones (narrow tiles and
    more programs per SM vs dequantizing each weight tile once)."""
    from aphrodite.kernels.int4_matmul import Config
    return [Config(64, 64, 64, target=1, warps=4, stages=3, w4=True),
            Config(64, 64, 128, target=2, warps=8, stages=4, w4=True),
            Config(64, 64, 128, target=2, warps=4, stages=3, w4=True),
            Config(128, 64, 128, target=1, warps=8, stages=2, w4=True),
            Config(128, 64, 64, target=1, warps=8, stages=4, w4=True),
            Config(128, 128, 64, target=1, warps=8, stages=3, w4=True),
            Config(256, 64, 64, target=1, warps=8, stages=3, w4=True),
            Config(128, 128, 128, target=1, warps=8, stages=2, w4=True, ahead=1),
            Config(256, 128, 64, target=1, warps=8, stages=4, w4=True)]


def _bf16_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wk, stride_om, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Calibration: the W4A16 kernel's loop with a dense bf16 ``[K, N]`` weight and no dequantization (same
    program order, tiles and pipeline), so the sweep shows what the dequantization costs."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None])


def _calibrate(weights, gen) -> list[str]:
    """Dense-bf16 twin of the W4A16 loop at a few tiles (us); errors are reported, not raised."""
    kern = triton.jit(_bf16_gemm_kernel)
    lines = []
    for m in (64, 256):
        for name in ("o_proj", "gate_up"):
            k, n = SHAPES[name]
            wd = weights[name][2].t().contiguous()                 # [K, N] bf16
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
            res = []
            for bm, bn, bk, nw, ns in ((64, 64, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
                                       (256, 128, 64, 8, 3)):
                grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
                try:
                    def run(bm=bm, bn=bn, bk=bk, nw=nw, ns=ns, grid=grid, x=x, wd=wd, out=out, m=m, n=n, k=k):
                        kern[grid](x, wd, out, m, n, k, x.stride(0), wd.stride(0), out.stride(0), BLOCK_M=bm,
                                   BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
                    run()
                    err = _err(out, x.float() @ wd.float())
                    res.append(f"m{bm}n{bn}k{bk}w{nw}s{ns}:{graph_us(run, reps=20):.1f}" + ("!" if err > 1e-2 else ""))
                except Exception as e:  # noqa: BLE001
                    res.append(f"m{bm}n{bn}: {e!r}"[:80])
            lines.append(f"{name:9s} M={m:4d} " + "  ".join(res))
    return lines


def _fp8(x, w8, w8a8: bool | None = None):
    """What Fp8LinearMethod.apply runs for an online-quantized (per-channel) weight (``w8a8``: force the
    activation-quantized path or the weight-only one)."""
    from aphrodite.kernels.fp8_quant import per_token_quant_fp8, scaled_mm_fp8
    from aphrodite.kernels.int4_matmul import quant_matmul
    from aphrodite.modeling.layers.quantization.fp8 import WEIGHT_ONLY_ROWS
    if (x.shape[0] > WEIGHT_ONLY_ROWS) if w8a8 is None else w8a8:
        xq, xs = per_token_quant_fp8(x)
        return scaled_mm_fp8(xq, xs, w8.weight, w8.scales, x.dtype)
    return quant_matmul(x, w8)


def _fp8_ref(x, w8, w8a8: bool | None = None):
    from aphrodite.kernels.fp8_quant import per_token_quant_fp8_ref
    from aphrodite.kernels.int4_matmul import dequantize
    from aphrodite.modeling.layers.quantization.fp8 import WEIGHT_ONLY_ROWS
    d = dequantize(w8, torch.float32)
    if (x.shape[0] > WEIGHT_ONLY_ROWS) if w8a8 is None else w8a8:
        xq, xs = per_token_quant_fp8_ref(x)
        return (xq.float() * xs) @ d
    return x.float() @ d


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def _name(c) -> str:
    if c.dequant:
        return "dequant+mm"
    return (f"m{c.block_m}n{c.block_n}k{c.block_k}w{c.warps}s{c.stages}" + ("S" if c.swap else "")
            + ("G" if c.wgmma else "") + (f"A{c.ahead}" if c.ahead else "")
            + (f"/t{c.target}" if not c.splits else f"/k{c.splits}"))


def check_only(budget: float) -> None:
    """Correctness of every kernel path this branch can dispatch, at real sizes, against dequantize + matmul
    in fp32: PASS/FAIL per case, no timing. Cases run in priority order; past ``budget`` seconds the rest
    print SKIP."""
    import os
    os.environ["APHRODITE_QUANT_TUNE"] = "0"       # dispatch cases take the untuned defaults: no timing runs
    from aphrodite.kernels import int4_matmul as im
    from aphrodite.kernels.fp8_quant import (
        W8A8Config,
        _w8a8_candidates,
        per_token_quant_fp8,
        per_token_quant_fp8_ref,
        scaled_mm_fp8,
    )
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    wts = {name: random_weights(*SHAPES[name], gen) for name in ("qkv_proj", "down_proj", "o_proj")}
    cases = []      # (label, thunk returning (got, ref, tol))

    def int4_case(name, m, cfg, dtype=torch.bfloat16):
        def run():
            w4 = wts[name][0]
            x = torch.randn(m, SHAPES[name][0], device="cuda", generator=gen, dtype=dtype)
            if dtype != torch.bfloat16:
                w4 = dataclasses.replace(w4, scales=w4.scales.to(dtype), zeros=w4.zeros.to(dtype))
            return im.quant_matmul(x, w4, config=cfg), x.float() @ im.dequantize(w4, torch.float32), 1e-2
        cases.append((f"int4 {name} M={m} {_name(cfg) if cfg else 'dispatch'} {str(dtype)[6:]}", run))

    # First what the engine runs untuned or most likely tuned, then the other shapes the tuner may pick.
    for m in (16, 32, 64, 128, 256):
        int4_case("qkv_proj", m, im._w4_candidates(m)[0])
    for m in (1, 3, 16, 100):                   # GEMV and the general kernel's default (the nibble order changed)
        int4_case("qkv_proj", m, None)
    int4_case("qkv_proj", 1024, im.Config(dequant=True))
    for name, m in (("down_proj", 64), ("o_proj", 200), ("o_proj", 1000)):     # the Gluon wgmma kernel
        int4_case(name, m, im._wgmma_candidates(im._rows_bucket(m))[0])
    int4_case("qkv_proj", 48, im._w4_candidates(64)[0], torch.float16)
    int4_case("down_proj", 64, im._w4_candidates(64)[0])
    def actorder():
        k, n = SHAPES["qkv_proj"]
        codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, device="cuda", generator=gen)
        scales = (torch.rand(k // 128, n, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // 128, n), device="cuda", generator=gen).to(torch.bfloat16)
        g_idx = torch.randperm(k, device="cuda", generator=gen) // 128
        w = im.repack_int4(codes, scales, zeros, 128, g_idx)
        x = torch.randn(64, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        ref = x.float().index_select(1, w.perm.long()) @ im.dequantize(w, torch.float32)
        return im.quant_matmul(x, w, config=im._w4_candidates(64)[0]), ref, 1e-2
    cases.append(("int4 act-order qkv_proj M=64 W4A16", actorder))

    def fp8_case(name, m, cfg):
        def run():
            w8 = wts[name][1]
            x = torch.randn(m, SHAPES[name][0], device="cuda", generator=gen, dtype=torch.bfloat16)
            if cfg is None:         # weight-only (GEMV / general kernel)
                return im.quant_matmul(x, w8), x.float() @ im.dequantize(w8, torch.float32), 1e-2
            xq, xs = per_token_quant_fp8(x)
            rq, rs = per_token_quant_fp8_ref(x)
            bad = (xq.float() != rq.float()).float().mean().item()      # x * (1/s) vs x / s: rare ties
            if bad > 1e-2 or not torch.allclose(xs, rs, rtol=1e-6, atol=0):
                raise AssertionError(f"per-token quantization differs from the reference ({bad:.1e} of codes)")
            ref = (xq.float() * xs) @ im.dequantize(w8, torch.float32)
            return scaled_mm_fp8(xq, xs, w8.weight, w8.scales, torch.bfloat16, config=cfg), ref, 2e-2
        label = "weight-only" if cfg is None else ("_scaled_mm" if cfg.cublas else
                                                  f"triton m{cfg.block_m}n{cfg.block_n}k{cfg.block_k}t{cfg.target}")
        cases.append((f"fp8 {name} M={m} {label}", run))

    for c in _w8a8_candidates(64):
        fp8_case("o_proj", 64, c)
    fp8_case("down_proj", 256, W8A8Config(64, 128, 128, target=1))
    fp8_case("down_proj", 1024, _w8a8_candidates(1024)[1])
    for m in (1, 16):
        fp8_case("qkv_proj", m, None)
    for m in (16, 32, 64, 128, 256):            # the remaining W4A16 shapes of the tuner's table
        for c in im._w4_candidates(m)[1:]:
            if not c.dequant:
                int4_case("qkv_proj", m, c)
    for m in (16, 256):
        int4_case("down_proj", m, im._w4_candidates(m)[0])
    int4_case("qkv_proj", 128, im._candidates(128)[1])

    fails = 0
    for label, run in cases:
        if time.perf_counter() - t0 > budget:
            print(f"SKIP  {label} (budget {budget:.0f} s)", flush=True)
            continue
        try:
            got, ref, tol = run()
            err = _err(got, ref)
            ok = err < tol and bool(torch.isfinite(got).all())
            fails += not ok
            print(f"{'PASS' if ok else 'FAIL'}  {label}  err {err:.1e} (tol {tol:.0e})", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            fails += 1
            print(f"FAIL  {label}  {e!r}"[:300], flush=True)
    print(f"== {len(cases)} cases, {fails} failed, {time.perf_counter() - t0:.0f} s ==")
    # A few timings of kernels compiled above (no sweep): bf16 vs the engine's int4 table vs the general
    # kernel's default, us per call from a CUDA graph of 20.
    for m in (16, 64, 256):
        for name in ("qkv_proj", "down_proj"):
            if time.perf_counter() - t0 > budget + 8:
                break
            try:
                w4, _, wf = wts[name]
                x = torch.randn(m, SHAPES[name][0], device="cuda", generator=gen, dtype=torch.bfloat16)
                out = torch.empty((m, SHAPES[name][1]), dtype=x.dtype, device="cuda")
                tb = graph_us(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf), reps=20)
                tt = graph_us(lambda x=x, w=w4: im.quant_matmul(x, w), reps=20)
                old_cfg = im._candidates(im._rows_bucket(m))[0]
                to = graph_us(functools.partial(im._launch, x, w4, None, out, old_cfg), reps=20)
                print(f"time {name:9s} M={m:3d}  bf16 {tb:6.1f}  int4 table {tt:6.1f}  int4 general-kernel default "
                      f"{to:6.1f} us", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"time {name} M={m}: {e!r}"[:200], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--old", action="store_true", help="also time the general kernel (APHRODITE_QUANT_GEMV=old path)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which the sweep stops")
    ap.add_argument("--check-only", action="store_true", help="correctness of every path at real sizes, no timing")
    args = ap.parse_args()
    if args.check_only:
        check_only(min(args.budget, 35.0))     # + timings and ~10 s of start-up: under a minute
        return
    from aphrodite.kernels import int4_matmul as im
    from aphrodite.kernels.fp8_quant import per_token_quant_fp8
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: random_weights(k, n, gen) for name, (k, n) in SHAPES.items()}
    deq = {name: im.dequantize(ws[0], torch.float32) for name, ws in weights.items()}
    rows_out = []   # (proj, M, bf16, int4, int4 old, fp8, fp8 the other path, fp8 quant-only, err4, err8, note)
    print("== correctness and time per call (us, CUDA graph of 50) ==", flush=True)
    for m in ROWS:
        for name, (k, n) in SHAPES.items():
            w4, w8, wf = weights[name]
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            note = ""
            tb = t4 = to = t8 = t8o = tq = e4 = e8 = float("nan")
            try:
                tb = graph_us(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf))
            except Exception as e:  # noqa: BLE001 - report and go on
                note += f" bf16 failed {e!r}"[:120]
            try:
                got = im.quant_matmul(x, w4)
                e4 = _err(got, x.float() @ deq[name])
                if not torch.equal(got, im.quant_matmul(x, w4)):
                    note += " int4-NOT-REPEATABLE"
                t4 = graph_us(lambda x=x, w=w4: im.quant_matmul(x, w))
            except Exception:  # noqa: BLE001
                note += " int4 failed: " + traceback.format_exc(limit=3)[-400:].replace("\n", " | ")
            if args.old and m > 4:
                try:
                    out = torch.empty((m, n), dtype=x.dtype, device="cuda")
                    cands = im._candidates(im._rows_bucket(m))
                    run = functools.partial(im._launch, x, w4, None, out)
                    best = min(cands, key=lambda c: graph_us(functools.partial(run, c), reps=10))
                    to = graph_us(functools.partial(run, best))
                except Exception as e:  # noqa: BLE001
                    note += f" old failed {e!r}"[:120]
            try:
                got = _fp8(x, w8)
                e8 = _err(got, _fp8_ref(x, w8))
                t8 = graph_us(lambda x=x, w=w8: _fp8(x, w))
                tq = graph_us(lambda x=x: per_token_quant_fp8(x))
            except Exception:  # noqa: BLE001
                note += " fp8 failed: " + traceback.format_exc(limit=3)[-400:].replace("\n", " | ")
            try:
                from aphrodite.modeling.layers.quantization.fp8 import WEIGHT_ONLY_ROWS
                if m > 64:
                    raise RuntimeError("not timed above 64 rows")
                other = m <= WEIGHT_ONLY_ROWS         # the path the engine does not take at this M
                if _err(_fp8(x, w8, other), _fp8_ref(x, w8, other)) > 3e-2:
                    note += " fp8-other-FAIL"
                t8o = graph_us(lambda x=x, w=w8, o=other: _fp8(x, w, o))
            except Exception as e:  # noqa: BLE001
                note += f" fp8-other failed {e!r}"[:100]
            bad = (e4 == e4 and e4 > 1e-2) or (e8 == e8 and e8 > 3e-2) or e4 != e4 or e8 != e8
            note = ("FAIL" if bad else "ok") + note
            rows_out.append((name, m, tb, t4, to, t8, t8o, tq, e4, e8, note))
            print(f"{name:9s} M={m:4d}  bf16 {tb:8.1f}  int4 {t4:8.1f}  old {to:8.1f}  fp8 {t8:8.1f} "
                  f"(other path {t8o:7.1f}, quant {tq:5.1f})  err int4 {e4:.1e} fp8 {e8:.1e}  {note}", flush=True)
    print("== tuner choices (fmt, rows bucket, N, K) ==", flush=True)
    for key, cfg in sorted(im.tuned_configs().items(), key=str):
        print(f"  {key[:4]}: {_name(cfg)}", flush=True)
    from aphrodite.kernels.fp8_quant import tuned_w8a8_configs
    for key, cfg in sorted(tuned_w8a8_configs().items(), key=str):
        print(f"  W8A8 {key[:3]}: " + ("torch._scaled_mm" if cfg.cublas else
                                       f"triton m{cfg.block_m}n{cfg.block_n}k{cfg.block_k}w{cfg.warps}"
                                       f"s{cfg.stages}/t{cfg.target}"), flush=True)
    sweep = []
    if not args.no_sweep:
        print("== W4A16 launch shapes, fastest first (us; ! = error over 1e-2) ==", flush=True)
        for m in SWEEP_ROWS:
            for name, (k, n) in SHAPES.items():
                if time.perf_counter() - t_start > args.budget:
                    print(f"{name} M={m}: sweep skipped (budget {args.budget:.0f} s)", flush=True)
                    continue
                w4 = weights[name][0]
                x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
                out = torch.empty((m, n), dtype=x.dtype, device="cuda")
                ref = x.float() @ deq[name]
                res = []
                cands = im._w4_candidates(im._rows_bucket(m))
                for c in cands + ([c for c in _explore() if c not in cands] if m >= 64 else []):
                    if not c.dequant and not im.w4_supported(x, w4, c):
                        continue
                    try:
                        run = functools.partial(im._launch, x, w4, None, out, c)
                        run()
                        err = _err(out, ref)
                        res.append((graph_us(run, reps=20), c, err))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} M={m} {_name(c)}: {e!r}"[:300], flush=True)
                res.sort(key=lambda r: r[0])
                if res:
                    line = "  ".join(f"{_name(c)}:{t:.1f}{'!' if err > 1e-2 else ''}" for t, c, err in res)
                    print(f"{name:9s} M={m:4d} {line}", flush=True)
                    sweep.append((name, m, res[0][0], _name(res[0][1])))
    if not args.no_sweep and time.perf_counter() - t_start < args.budget + 20:
        print("== calibration: the same loop on a dense bf16 weight, no dequantization (us) ==", flush=True)
        try:
            for line in _calibrate(weights, gen):
                print(line, flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"calibration failed: {e!r}", flush=True)
    print(f"\n== summary: us per call, x = bf16 time / quantized time ({time.perf_counter() - t_start:.0f} s) ==")
    print("(fp8 = the engine's path: weight-only kernel at M <= WEIGHT_ONLY_ROWS, else per-token quant + "
          "_scaled_mm; fp8o = the other one; fp8q = the quant kernel alone)")
    print(f"{'proj':9s} {'M':>4s} {'bf16':>7s} {'int4':>7s} {'x':>5s} {'old':>7s} {'fp8':>7s} {'x':>5s} "
          f"{'fp8o':>7s} {'fp8q':>5s}  check")
    for name, m, tb, t4, to, t8, t8o, tq, _e4, _e8, note in rows_out:
        print(f"{name:9s} {m:4d} {tb:7.1f} {t4:7.1f} {tb / t4:5.2f} {to:7.1f} {t8:7.1f} {tb / t8:5.2f} {t8o:7.1f} "
              f"{tq:5.1f}  {note[:40]}")
    for name, m, t, c in sweep:
        print(f"best w4 {name:9s} M={m:4d} {t:7.1f} us  {c}")


if __name__ == "__main__":
    main()
