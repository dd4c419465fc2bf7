"""int4 (W4A16, group 128) decode GEMVs on one H200: every Gluon shape checked against dequantize + matmul, then
timed against the Triton GEMV and bf16 on Llama-3.1-8B's projections.

1. Diagnostics (small shapes, so that one run localizes a wrong kernel): one group / one column block / one
   split, several groups and splits, with and without zero points, random x and one-hot x (a one-hot row of x
   selects one row of the weight, so a wrong nibble order shows as a column permutation: printed), 1/2/4 rows.
   The reference is float64 dequantize-then-matmul of the same packed weight.
2. The 8B shapes at 1, 2, 4 rows (and 8, 16 for the batched int4 path and bf16): each launch shape checked
   (max |err| / max |ref| < 1e-2, repeatable), then timed in a CUDA graph that cycles through enough copies of
   the weight to exceed the L2 (a decode step reads each layer's weights once: no L2 reuse).

    python3 benchmarks/gpu/check_w4_gemv.py [--budget 90] [--rows 1,2,4,8,16] [--diag-rows 1,2,4] [--triton-all]

The table at the end gives us per call (and TB/s of the packed weight + scales + zeros) for bf16, the Triton
GEMV, the best shape of each Gluon kernel, and the sum over one layer's four projections.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import graph_us  # noqa: E402

from aphrodite.kernels import int4_matmul as im  # noqa: E402
from aphrodite.kernels import quant_gemv as qg  # noqa: E402

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down_proj": (14336, 4096)}
TOL = 1e-2


def cname(c: qg.GemvConfig) -> str:
    if not c.gluon:
        return f"tri:b{c.block}k{c.block_k}w{c.warps}t{c.target}"
    if c.tk:
        return (f"v2:r{c.block_k}v{c.vec}tk{c.tk}wk{c.wk}w{c.warps}{'s' if c.ring else 'd'}{c.stages}t{c.target}"
                + (f"r{c.maxnreg}" if c.maxnreg else ""))
    return f"v1:k{c.block_k}w{c.warps}wk{c.wk}s{c.stages}t{c.target}"


def make_weight(k: int, n: int, gen: torch.Generator, zp: bool, group: int = 128) -> im.QuantWeight:
    codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, device="cuda", generator=gen)
    scales = (torch.rand(k // group, n, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // group, n), device="cuda", generator=gen).to(torch.bfloat16) if zp else None
    return im.repack_int4(codes, scales, zeros, group)


def reference(x: torch.Tensor, w: im.QuantWeight) -> torch.Tensor:
    """float64 dequantize (from the packed words, independent of the kernels) then matmul."""
    q = im.unpack_int4_cols(w.weight, im.INT4_ORDER).to(torch.float64)
    rows = torch.arange(w.k, device=q.device) // w.group
    s = w.scales.to(torch.float64)[rows]
    z = 8.0 if w.zeros is None else w.zeros.to(torch.float64)[rows]
    return x.to(torch.float64) @ ((q - z) * s)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.to(torch.float64) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def perm_hint(got: torch.Tensor, ref: torch.Tensor) -> str:
    """For a one-hot x: which reference column each of the first word's 8 outputs matches (-1: none)."""
    g, r = got[0, :8].double(), ref[0, :8]
    match = []
    for j in range(8):
        d = (r - g[j]).abs()
        i = int(d.argmin())
        match.append(i if d[i] <= 1e-2 * r.abs().max() else -1)
    return "cols" + "".join(str(m) if m >= 0 else "?" for m in match)


def int4_candidates() -> list[qg.GemvConfig]:
    return qg.gluon_gemv_candidates(im.FMT_INT4)


def run_cfg(x, w, cfg):
    if cfg is None:
        return qg.quant_gemv(x, w, config=qg._candidates(w)[0])
    return qg.quant_gemv(x, w, config=cfg)


def diagnostics(gen: torch.Generator, fails: list, diag_rows: tuple[int, ...]) -> dict:
    """Small shapes; returns {candidate name: number of failed cases}."""
    # one group (one split, zero points), 8 groups without zero points (split-K), the 4096 x 4096 shape (zero
    # points, split-K) at every diagnostic row count: three compiled variants a shape at one row
    cases = [(128, 2048, True, [1] if 1 in diag_rows else []), (1024, 2048, False, [1] if 1 in diag_rows else []),
             (4096, 4096, True, list(diag_rows))]
    cases = [(k, n, zp, ms, make_weight(k, n, gen, zp)) for k, n, zp, ms in cases if ms]
    bad: dict[str, int] = {}
    print("== diagnostics: err per case (K x N, z/s = zero points or not, rows, x = r random / f one-hot at k=5 / "
          "l one-hot at k=K-3); hint = the ref column each of outputs 0..7 matches ==")
    for cfg in [None] + int4_candidates():
        name = "triton" if cfg is None else cname(cfg)
        cells, nbad = [], 0
        for k, n, zp, ms, w in cases:
            for m in ms:
                for kind in ("rand", "first", "last"):
                    if kind != "rand" and m > 1:
                        continue
                    if kind == "rand":
                        x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
                    else:
                        x = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
                        x[0, 5 if kind == "first" else k - 3] = 1.0
                    if cfg is not None and not qg.gluon_gemv_ok(x, w, cfg):
                        continue
                    tag = f"{k}x{n}{'z' if zp else 's'}m{m}{kind[0]}"
                    try:
                        got = run_cfg(x, w, cfg)
                        torch.cuda.synchronize()
                        ref = reference(x, w)
                        err = rel_err(got, ref)
                        ok = err < TOL and bool(torch.isfinite(got).all())
                    except Exception:  # noqa: BLE001 - report and go on
                        print(f"  {name} {tag}: " + traceback.format_exc(limit=3)[-500:], flush=True)
                        ok, err = False, float("nan")
                    if not ok:
                        nbad += 1
                        hint = perm_hint(got, ref) if kind != "rand" and err == err else ""
                        cells.append(f"{tag}:{err:.1e}{'!' + hint if hint else '!'}")
        bad[name] = nbad
        shown = " ".join(cells[:10]) + (" ..." if len(cells) > 10 else "")
        print(f"{name:34s} {'ok' if nbad == 0 else f'{nbad} FAIL'} {shown}", flush=True)
        if nbad:
            fails.append(name)
    return bad


def rotated_us(fn_for, copies: int) -> float:
    """us per call in a graph that cycles ``copies`` weight copies (``fn_for(i)`` calls on copy i)."""
    reps = max(24, 2 * copies)
    i = [0]

    def step():
        fn_for(i[0] % copies)
        i[0] += 1
    return graph_us(step, reps=reps)


def bench_shape(name: str, k: int, n: int, m: int, cands: list, gen: torch.Generator, l2_mb: float,
                fails: list, triton_all: bool) -> dict:
    """Check and time one projection at ``m`` rows (weights cycled through copies that exceed the L2)."""
    w = make_weight(k, n, gen, True)
    nbytes = sum(t.numel() * t.element_size() for t in w.tensors())
    copies = max(2, min(24, int(l2_mb * 1e6 // nbytes) + 1))
    ws = [w] + [im.QuantWeight(w.fmt, w.weight.clone(), w.scales.clone(), w.k, w.n, w.group, zeros=w.zeros.clone())
                for _ in range(copies - 1)]
    wb = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    wbs = [wb] + [wb.clone() for _ in range(max(1, min(copies, int(l2_mb * 1e6 // wb.nbytes) + 1)) - 1)]
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    ref = reference(x, w)
    tb = rotated_us(lambda i: torch.nn.functional.linear(x, wbs[i % len(wbs)]), len(wbs))
    row = {"name": name, "m": m, "bytes": nbytes, "bf16": tb}
    if m > qg.MAX_ROWS:          # the batched int4 path (int4_matmul's table)
        err = rel_err(im.quant_matmul(x, w), ref)
        row["table"] = rotated_us(lambda i: im.quant_matmul(x, ws[i]), copies)
        print(f"{name:9s} M={m:2d} bf16 {tb:6.1f}  int4 table {row['table']:6.1f} (err {err:.1e})", flush=True)
        return row
    triton_cfg = qg._candidates(w)[0]
    err = rel_err(qg.quant_gemv(x, w, config=triton_cfg), ref)
    row["triton"] = rotated_us(lambda i: qg.quant_gemv(x, ws[i], config=triton_cfg), copies)
    row["default"] = rotated_us(lambda i: qg.quant_gemv(x, ws[i]), copies)
    err_default = rel_err(qg.quant_gemv(x, w), ref)           # what the engine runs (a Gluon shape on sm_90)
    if err_default > TOL:
        fails.append(f"default {name} M={m}")
    res = []
    for c in cands + ([c for c in qg._candidates(w)[1:] if not c.gluon] if triton_all else []):
        if c.gluon and not qg.gluon_gemv_ok(x, w, c):
            continue
        try:
            got = qg.quant_gemv(x, w, config=c)
            e = rel_err(got, ref)
            same = torch.equal(got, qg.quant_gemv(x, w, config=c))
            if e > TOL or not same:
                fails.append(f"{cname(c)} {name} M={m}")
                print(f"FAIL {cname(c)} {name} M={m} err {e:.1e} repeatable {same}", flush=True)
                continue
            res.append((rotated_us(lambda i, c=c: qg.quant_gemv(x, ws[i], config=c), copies), cname(c)))
        except Exception:  # noqa: BLE001
            fails.append(f"{cname(c)} {name} M={m}")
            print(f"FAIL {cname(c)} {name} M={m}: " + traceback.format_exc(limit=3)[-500:], flush=True)
    res.sort()
    for ver in ("v1", "v2", "tri"):
        best = [r for r in res if r[1].startswith(ver)]
        row[ver] = best[0] if best else (float("nan"), "-")
    print(f"{name:9s} M={m} bf16 {tb:6.1f} triton {row['triton']:6.1f} (err {err:.1e}) default "
          f"{row['default']:6.1f} (err {err_default:.1e}) | " + "  ".join(f"{c}:{t:.1f}" for t, c in res), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=90.0, help="seconds of timing after the diagnostics")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--diag-rows", default="1,2,4", help="rows of the diagnostic cases ('' skips them)")
    ap.add_argument("--triton-all", action="store_true", help="also time the Triton GEMV's other shapes")
    ap.add_argument("--l2-mb", type=float, default=160.0, help="weight bytes cycled per timed graph")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  sms {qg._num_sms(torch.device('cuda'))}",
          flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    fails: list = []
    bad = diagnostics(gen, fails, tuple(int(r) for r in args.diag_rows.split(",") if r))
    print(f"(diagnostics {time.perf_counter() - t0:.0f} s)", flush=True)
    t1 = time.perf_counter()
    cands = [c for c in int4_candidates() if bad.get(cname(c), 0) == 0]
    summary = []
    for m in (int(r) for r in args.rows.split(",")):
        for name, (k, n) in SHAPES.items():
            if time.perf_counter() - t1 > args.budget:
                print(f"{name} M={m}: skipped (budget)", flush=True)
                continue
            summary.append(bench_shape(name, k, n, m, cands, gen, args.l2_mb, fails, args.triton_all))
    print(f"\n== int4 GEMV ({time.perf_counter() - t0:.0f} s, {len(fails)} failures"
          f"{': ' + ', '.join(fails[:8]) if fails else ''}): us per call from a graph over "
          f"{args.l2_mb:.0f} MB of weight copies; TB/s of int4 weight+scales+zeros ==")
    print(f"{'proj':9s} {'M':>2s} {'bf16':>6s} {'triton':>6s} {'TB/s':>4s} {'dflt':>6s} {'v1':>6s} {'v2':>6s} "
          f"{'TB/s':>4s}  best v1 / best v2 / best other Triton shape")
    layer: dict[int, list[float]] = {}
    for r in summary:
        m = r["m"]
        if "table" in r:
            print(f"{r['name']:9s} {m:2d} {r['bf16']:6.1f} {'int4 table':>11s} {r['table']:6.1f}")
            continue
        t1, n1 = r["v1"]
        t2, n2 = r["v2"]
        best = min(x for x in (r["triton"], t1, t2, r["tri"][0]) if x == x)
        print(f"{r['name']:9s} {m:2d} {r['bf16']:6.1f} {r['triton']:6.1f} {r['bytes'] / r['triton'] / 1e6:4.2f} "
              f"{r['default']:6.1f} {t1:6.1f} {t2:6.1f} {r['bytes'] / best / 1e6:4.2f}  {n1} / {n2} / "
              f"{r['tri'][1]} {r['tri'][0]:.1f}")
        acc = layer.setdefault(m, [0.0] * 6)
        for i, v in enumerate((r["bf16"], r["triton"], r["default"], t1 if t1 == t1 else r["triton"],
                               t2 if t2 == t2 else r["triton"], best)):
            acc[i] += v
    for m, (b, t, d, v1, v2, bb) in layer.items():
        print(f"layer M={m}: bf16 {b:.1f} triton {t:.1f} default {d:.1f} v1 {v1:.1f} v2 {v2:.1f} best {bb:.1f} us "
              f"(x32 layers: triton {t * 32 / 1e3:.2f} ms, best {bb * 32 / 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
