"""Qwen3-30B-A3B's shape (bf16, dummy weights) on one H200: the fused-MoE kernel, then the engine.

1. Kernel: ``fused_experts`` (Triton grouped GEMM) against its PyTorch reference at the model's sizes
   (128 experts, top-8, hidden 2048, expert intermediate 768) for decode- and prefill-sized batches:
   relative max error vs an fp32 reference, and time per call of both.
2. latency-1 (1 x 128 in / 256 out) with the HF baseline, and throughput-decode (``--decode-prompts``
   x 128/1024, default 500 of DESIGN.md's 1000 to stay near 3 minutes) through ``LLM``.
3. Roofline of the active parameters: batch-1 decode bound by reading them once per token from HBM;
   large-batch decode bound by 2 FLOPs per active parameter per token.

    python3 benchmarks/gpu/bench_moe_gpu.py [--decode-prompts 1000]

Floors (vLLM 0.26, same H200 and harness): latency-1 >= 240 tok/s, throughput-decode >= 8.5k out tok/s.
"""
from __future__ import annotations

import argparse

import torch
from _shapes import H200_BF16_FLOPS, H200_HBM_BYTES_PER_S, active_params, bench
from _timing import eager_us

SHAPE = "qwen3-30b-a3b"



def kernel_check() -> list[str]:
    from aphrodite.kernels.fused_moe import fused_experts, fused_experts_ref
    from aphrodite.modeling.layers.moe import select_experts
    e, k, h, i = 128, 8, 2048, 768
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) / h ** 0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) / i ** 0.5).bfloat16()
    rows = ["KERNEL tokens | rel. max err vs fp32 | triton ms | torch ref ms | speedup"]
    worst = 0.0
    for t in (1, 8, 64, 512, 4096):
        x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
        weights, ids = select_experts(torch.randn(t, e, device="cuda", generator=g), k, renormalize=True)
        out = fused_experts(x, w13, w2, weights.bfloat16(), ids)
        ref = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        wb = weights.bfloat16()
        ms = eager_us(lambda x=x, wb=wb, ids=ids: fused_experts(x, w13, w2, wb, ids), 20) / 1e3
        ms_ref = eager_us(lambda x=x, wb=wb, ids=ids: fused_experts_ref(x, w13, w2, wb, ids), 5) / 1e3
        rows.append(f"KERNEL {t:6d} | {err:.2e} | {ms:.3f} | {ms_ref:.3f} | {ms_ref / ms:.1f}x")
    rows.append(f"KERNEL {'ok' if worst < 2e-2 else 'MISMATCH'} (worst relative error {worst:.2e}, bf16)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decode-prompts", type=int, default=500)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    table = kernel_check()
    print("\n".join(table), flush=True)

    hf = [] if args.skip_hf else ["--baseline", "hf", "--hf-num-iters-warmup", "0", "--hf-num-iters", "1"]
    lat = bench("latency", SHAPE, "--batch-size", "1", "--input-len", "128", "--output-len", "256",
                "--num-iters-warmup", "2", "--num-iters", "5", *hf)
    dec = bench("throughput", SHAPE, "--num-prompts", str(args.decode_prompts), "--input-len", "128",
                "--output-len", "1024", timeout=500)

    p = active_params(SHAPE)
    bytes_per_token = 2 * p["active"]
    roof_lat = H200_HBM_BYTES_PER_S / bytes_per_token
    roof_dec = H200_BF16_FLOPS / (2 * p["active"])
    table.append(f"PARAMS total {p['total'] / 1e9:.2f} B, active per token {p['active'] / 1e9:.2f} B")
    if "error" in lat:
        table.append(f"LATENCY-1 failed: {lat['error']}")
    else:
        tps = 256 / lat["avg_latency"]
        line = (f"LATENCY-1 {tps:.1f} out tok/s ({1000 * lat['avg_latency'] / 256:.2f} ms/token incl. prefill), "
                f"floor 240 -> {'PASS' if tps >= 240 else 'BELOW'}; roofline {roof_lat:.0f} tok/s "
                f"({100 * tps / roof_lat:.0f}% of it); start-up {lat.get('engine_startup_s', 0):.0f} s")
        if "speedup_vs_hf" in lat:
            line += f"; {lat['speedup_vs_hf']:.2f}x HF"
        table.append(line)
    if "error" in dec:
        table.append(f"DECODE failed: {dec['error']}")
    else:
        out_tps = dec["output_tokens_per_second"]
        verdict = "PASS" if out_tps >= 8500 else "BELOW"
        table.append(f"DECODE {args.decode_prompts} x 128/1024: {out_tps:.0f} out tok/s, "
                     f"{dec['requests_per_second']:.2f} req/s; floor 8500 -> {verdict}; compute roofline "
                     f"{roof_dec:.0f} tok/s ({100 * out_tps / roof_dec:.1f}%)")
    print("== table ==")
    print("\n".join(table))


if __name__ == "__main__":
    main()
