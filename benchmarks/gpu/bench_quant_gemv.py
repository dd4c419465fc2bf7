"""The decode GEMV (``aphrodite/kernels/quant_gemv.py``) vs the general fused kernel (``int4_matmul``, what
``APHRODITE_QUANT_GEMV=old`` runs) and bf16 ``F.linear`` on one H200, Llama-3.1-8B's four projections at
1, 2 and 4 rows, dummy weights: int4 W4A16 (group 128, asymmetric like AutoAWQ) and FP8 (per-channel).

For every row: max |err| / max |ref| of old and new against dequantize + matmul in fp32, whether the new
kernel is bitwise repeatable, and microseconds per call (a CUDA graph of 50 launches) with the weight
bandwidth. Then a short sweep of launch shapes for the new kernel at one row (a few seconds), and the table
last. Errors are caught and reported per row. Runs in well under 90 s:

    python3 benchmarks/gpu/bench_quant_gemv.py [--no-sweep]
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch
from _quant_weights import random_weights
from _timing import graph_us

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down_proj": (14336, 4096)}
ROWS = (1, 2, 4)



def _nbytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in w.tensors())


def _old(x, w):
    """The general kernel exactly as quant_matmul runs it with APHRODITE_QUANT_GEMV=old (tuned config)."""
    from aphrodite.kernels import int4_matmul as im
    out = torch.empty((x.shape[0], w.n), dtype=x.dtype, device=x.device)
    im._launch(x, w, None, out, im._config_for(x, w, None))
    return out


def _cfg_name(c) -> str:
    return f"b{c.block}/k{c.block_k}/t{c.target}/w{c.warps}" + ("/nodefer" if c.defer is False else "")


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--budget", type=float, default=70.0, help="seconds after which rows are skipped")
    args = ap.parse_args()
    from aphrodite.kernels.int4_matmul import dequantize, quant_matmul
    from aphrodite.kernels.quant_gemv import GemvConfig, gemv_enabled, quant_gemv, tuned_gemv_configs
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}  APHRODITE_QUANT_GEMV default new: {gemv_enabled()}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []       # (proj, fmt, M, bf16 us, old us, new us, GB, err old, err new, note)
    weights = {}
    for name, (k, n) in SHAPES.items():
        try:
            weights[name] = random_weights(k, n, gen)
        except Exception as e:      # noqa: BLE001 - report and go on
            print(f"{name}: weight setup failed: {e!r}", flush=True)
    print("== correctness and time per call (us, CUDA graph of 50) ==", flush=True)
    deq = {name: (dequantize(ws[0], torch.float32), dequantize(ws[1], torch.float32)) for name, ws in weights.items()}
    for m in ROWS:                  # one row first: what decode at batch 1 runs; later rows only while time lasts
        for name, (k, _n) in SHAPES.items():
            if name not in weights:
                continue
            if time.perf_counter() - t_start > args.budget:
                print(f"{name} M={m}: skipped (time budget {args.budget:.0f} s)", flush=True)
                continue
            w4, w8, wf = weights[name]
            d4, d8 = deq[name]
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            try:
                tb = graph_us(lambda x=x, wf=wf: torch.nn.functional.linear(x, wf))
            except Exception as e:  # noqa: BLE001
                tb = float("nan")
                print(f"{name} M={m} bf16 failed: {e!r}", flush=True)
            for fmt, w, d in (("int4", w4, d4), ("fp8", w8, d8)):
                note = ""
                eo = en = to = tn = float("nan")
                ref = x.float() @ d
                try:
                    eo = _err(_old(x, w), ref)
                    to = graph_us(lambda w=w, x=x: _old(x, w))
                except Exception as e:  # noqa: BLE001
                    note += f" old failed: {e!r}"[:200]
                try:
                    got = quant_gemv(x, w)
                    en = _err(got, ref)
                    if not torch.equal(got, quant_gemv(x, w)):
                        note += " NOT-REPEATABLE"
                    if not torch.equal(got, quant_matmul(x, w)):
                        note += " dispatch-differs"
                    tn = graph_us(lambda w=w, x=x: quant_gemv(x, w))
                except Exception:  # noqa: BLE001
                    note += " new failed: " + traceback.format_exc(limit=2)[-300:].replace("\n", " | ")
                ok = en < 1e-2 if fmt == "int4" else en < 2e-2
                note = ("ok" if ok else "FAIL") + note
                gb = _nbytes(w) / 1e9
                rows_out.append((name, fmt, m, tb, to, tn, gb, eo, en, note))
                print(f"{name:9s} {fmt:4s} M={m}  bf16 {tb:7.1f}  old {to:7.1f}  new {tn:7.1f}  "
                      f"err old {eo:.1e} new {en:.1e}  {note}", flush=True)
    sweep = []
    if not args.no_sweep:
        print("== new-kernel launch shapes at M=1 (us) ==", flush=True)
        cands = {"int4": [GemvConfig(32, 16, target=3), GemvConfig(32, 16, target=6),
                          GemvConfig(32, 8, target=6, warps=2),
                          GemvConfig(32, 8, target=12, warps=2), GemvConfig(32, 4, target=12, warps=1),
                          GemvConfig(32, 4, target=24, warps=1), GemvConfig(64, 8, target=4),
                          GemvConfig(16, 16, target=3), GemvConfig(32, 16, target=3, defer=False)],
                 "fp8": [GemvConfig(16, 512, target=2), GemvConfig(16, 512, target=4), GemvConfig(16, 512, target=8),
                         GemvConfig(8, 512, target=4), GemvConfig(32, 256, target=4), GemvConfig(16, 1024, target=4),
                         GemvConfig(32, 512, target=4, warps=8)]}
        for name, (k, _n) in SHAPES.items():
            if name not in weights or time.perf_counter() - t_start > args.budget - 10:
                continue
            w4, w8, _ = weights[name]
            x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            for fmt, w in (("int4", w4), ("fp8", w8)):
                res = []
                for c in cands[fmt]:
                    try:
                        res.append((graph_us(lambda c=c, w=w, x=x: quant_gemv(x, w, config=c)), c))
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} {fmt} {c}: {e!r}"[:200], flush=True)
                res.sort(key=lambda r: r[0])
                line = "  ".join(f"{_cfg_name(c)}:{t:.1f}" for t, c in res)
                print(f"{name:9s} {fmt:4s} {line}", flush=True)
                if res:
                    sweep.append((name, fmt, res[0][0], res[0][1]))
    print("== tuner choices of the new kernel (fmt 0 int4, 1 fp8; rows, N, K, ...) ==")
    for key, cfg in sorted(tuned_gemv_configs().items(), key=str):
        print(f"  {key[:4]}: {cfg}")
    print(f"\n== summary (us per call; GB/s = weight bytes / new time), {time.perf_counter() - t_start:.0f} s ==")
    print(f"{'proj':9s} {'fmt':4s} {'M':>2s} {'bf16':>7s} {'old':>7s} {'new':>7s} {'x old':>6s} {'GB/s':>6s}  check")
    for name, fmt, m, tb, to, tn, gb, _eo, _en, note in rows_out:
        print(f"{name:9s} {fmt:4s} {m:2d} {tb:7.1f} {to:7.1f} {tn:7.1f} {to / tn:6.2f} {gb / tn * 1e6:6.0f}  "
              f"{note[:60]}")
    for name, fmt, t, c in sweep:
        print(f"best M=1 {name:9s} {fmt:4s} {t:6.1f} us  {c}")


if __name__ == "__main__":
    main()
