"""Quantized weights on one H200, Llama-3.1-8B's shape with dummy weights: W4A16 (AutoAWQ layout), FP8
(``--quantization fp8``, quantized at load) and bf16 in the same run.

1. Kernels at real sizes: the fused dequantizing GEMM (int4 and fp8) and the FP8 W8A8 path vs dequantize +
   cuBLAS in fp32, for the four projections of a layer at 1..1024 rows; then per-projection time at
   batch 1 and 256 vs bf16 ``F.linear`` (and the bandwidth the int4 kernel reaches); then tiny checkpoints
   of several formats (and the fp8 KV cache) through the engine, greedy vs transformers.
2. The engine, each format in its own process: latency-1 (1 x 128 in / 256 out, ignore_eos) and
   throughput-decode (``--num-prompts`` x 128 / 1024, default 1000), with weight memory, peak memory and
   KV blocks. A table last.

    python3 benchmarks/gpu/bench_quant_gpu.py [--num-prompts 1000] [--skip-kernels] [--modes bf16,awq,fp8]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _quant_weights import random_weights
from _timing import graph_us

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 28672),
          "down_proj": (14336, 4096)}      # (K in, N out)
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


# ---------------------------------------------------------------------------------------------------
# 1. kernels
# ---------------------------------------------------------------------------------------------------


def _time_projection(x: torch.Tensor, w4, w8, wf: torch.Tensor) -> tuple[float, float, float]:
    """Microseconds of bf16 F.linear, the int4 kernel and the FP8 path (Triton W8A16 up to 16 rows, else
    per-token quantization + torch._scaled_mm) for one projection."""
    from aphrodite.kernels.fp8_quant import per_token_quant_fp8, scaled_mm_fp8
    from aphrodite.kernels.int4_matmul import quant_matmul

    def fp8() -> torch.Tensor:
        if x.shape[0] <= 16:
            return quant_matmul(x, w8)
        xq, xs = per_token_quant_fp8(x)
        return scaled_mm_fp8(xq, xs, w8.weight, w8.scales, torch.bfloat16)

    quant_matmul(x, w4)        # the tuner times its candidates outside the graph
    fp8()
    tb = graph_us(lambda: torch.nn.functional.linear(x, wf))
    return tb, graph_us(lambda: quant_matmul(x, w4)), graph_us(fp8)


def kernels() -> bool:
    from aphrodite.kernels.fp8_quant import per_token_quant_fp8, scaled_mm_fp8
    from aphrodite.kernels.int4_matmul import dequantize, quant_matmul, tuned_configs
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    ok = True
    print("== kernel correctness (max |err| / max |ref|, bf16 activations) ==", flush=True)
    weights = {}
    for name, (k, n) in SHAPES.items():
        w4, w8, wf = random_weights(k, n, gen)
        weights[name] = (w4, w8, wf)
        d4 = dequantize(w4, torch.float32)
        d8 = dequantize(w8, torch.float32)
        for m in (1, 4, 16, 64, 256, 1024):
            x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
            ref4 = x.float() @ d4
            e4 = ((quant_matmul(x, w4).float() - ref4).abs().max() / ref4.abs().max()).item()
            if m <= 16:
                out8 = quant_matmul(x, w8)
                ref8 = x.float() @ d8
            else:
                xq, xs = per_token_quant_fp8(x)
                out8 = scaled_mm_fp8(xq, xs, w8.weight, w8.scales, torch.bfloat16)
                ref8 = (xq.float() * xs) @ d8
            e8 = ((out8.float() - ref8).abs().max() / ref8.abs().max()).item()
            good = e4 < 1e-2 and e8 < 2e-2
            ok &= good
            print(f"{name:13s} M={m:5d}  int4 {e4:.2e}  fp8 {e8:.2e}  {'ok' if good else 'FAIL'}", flush=True)
    print("== per-projection time, us (CUDA graph of 50 launches) ==", flush=True)
    print(f"{'proj':13s} {'M':>5s} {'bf16':>8s} {'int4':>8s} {'fp8':>8s}  int4 GB/s", flush=True)
    for name, (k, n) in SHAPES.items():
        for m in (1, 256):
            tb, t4, t8 = _time_projection(torch.randn(m, k, device=dev, dtype=torch.bfloat16), *weights[name])
            nbytes = k * n // 2 + (k // 128) * n * 4
            print(f"{name:13s} {m:5d} {tb:8.1f} {t4:8.1f} {t8:8.1f}  {nbytes / t4 / 1e3:8.0f}", flush=True)
    print("== tuner choices ==")
    for key, cfg in sorted(tuned_configs().items(), key=str):
        print(f"  fmt={key[0]} rows<={key[1]} N={key[2]} K={key[3]}: {cfg}")
    return ok


def engine_correctness() -> bool:
    """Tiny Llama checkpoints in several formats (written by the CPU tests' packers) on CUDA in fp32:
    greedy tokens equal transformers on the dequantized weights; AWQ with CUDA graphs, the others eager;
    and the fp8 KV cache vs transformers with its K/V rounded through fp8."""
    import transformers.models.llama.modeling_llama as modeling_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from aphrodite import LLM, SamplingParams
    from tests.quantization.formats import write_quantized_checkpoint

    def tiny_llama() -> torch.nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)).float()
    eager = modeling_llama.eager_attention_forward

    def fp8_kv_attention(module, query, key, value, *args, **kwargs):   # K/V as an fp8 cache (scale 1) holds them
        return eager(module, query, key.to(torch.float8_e4m3fn).float(), value.to(torch.float8_e4m3fn).float(),
                     *args, **kwargs)

    ok = True
    prompts = [[5, 17, 200, 31, 8, 99, 12], list(range(40, 75)), [7] * 20]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("awq", "gptq_actorder", "fp8_online", "fp8_block", "ct_fp8_channel", "kv_fp8"):
            path = os.path.join(d, fmt)
            hf = write_quantized_checkpoint(tiny_llama(), Path(path), "awq" if fmt == "kv_fp8" else fmt).cuda()
            kw = {"quantization": "fp8"} if fmt == "fp8_online" else {}
            if fmt == "kv_fp8":
                kw["kv_cache_dtype"] = "fp8"
                modeling_llama.eager_attention_forward = fp8_kv_attention
                hf.config._attn_implementation = "eager"
            llm = LLM(path, dtype="float32", skip_tokenizer_init=True, max_model_len=128, max_num_seqs=8,
                      enforce_eager=fmt not in ("awq", "kv_fp8"), gpu_memory_utilization=0.3, **kw)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            same = 0
            for p, out in zip(prompts, outs):
                ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, min_new_tokens=12,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
                same += out.outputs[0].token_ids == ref
            if fmt == "kv_fp8":
                modeling_llama.eager_attention_forward = eager
            ok &= same == len(prompts)
            print(f"ENGINE {fmt:15s} greedy identical to transformers on dequantized weights: {same}/{len(prompts)}",
                  flush=True)
            del llm, hf
            gc.collect()
            torch.cuda.empty_cache()
    return ok


# ---------------------------------------------------------------------------------------------------
# 2. engine
# ---------------------------------------------------------------------------------------------------

def engine_run(mode: str, num_prompts: int, out_path: str) -> None:
    """One format: start the engine, latency-1, throughput-decode; results as JSON."""
    import numpy as np

    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.model_shapes import MODEL_SHAPES
    config = dict(MODEL_SHAPES["llama-3.1-8b"])
    if mode == "awq":
        config["quantization_config"] = AWQ_CONFIG
    res: dict = {"mode": mode}
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
        t0 = time.perf_counter()
        llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, quantization="fp8" if mode == "fp8" else None)
        res["startup_s"] = time.perf_counter() - t0
        runner = llm.llm_engine.executor.runner
        res["weights_gib"] = sum(p.numel() * p.element_size() for p in runner.model.parameters()) / 2**30
        res["kv_blocks"] = llm.llm_engine.config.cache.num_blocks
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        vocab = config["vocab_size"]
        rng = np.random.default_rng(0)

        def prompts(n: int) -> list[dict]:
            return [{"prompt_token_ids": p} for p in rng.integers(100, vocab - 100, size=(n, 128)).tolist()]

        lat = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=256, ignore_eos=True, detokenize=False)
        llm.generate(prompts(1), lat, use_tqdm=False)
        times = []
        for _ in range(3):
            p = prompts(1)
            t = time.perf_counter()
            out = llm.generate(p, lat, use_tqdm=False)
            times.append(time.perf_counter() - t)
            assert len(out[0].outputs[0].token_ids) == 256
        res["latency1_tok_s"] = 256 / (sum(times) / len(times))
        dec = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=1024, ignore_eos=True, detokenize=False)
        batch = prompts(num_prompts)
        t = time.perf_counter()
        outs = llm.generate(batch, dec, use_tqdm=False)
        secs = time.perf_counter() - t
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        res["decode_out_tok_s"] = gen / secs
        res["decode_req_s"] = num_prompts / secs
        res["decode_prompts"] = num_prompts
    with open(out_path, "w") as f:
        json.dump(res, f)
    print(json.dumps(res), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--modes", default="awq,fp8,bf16")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--engine-mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_mode:
        engine_run(args.engine_mode, args.num_prompts, args.out)
        return 0
    print(torch.cuda.get_device_name(), flush=True)
    ok = True if args.skip_kernels else kernels() & engine_correctness()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mode in args.modes.split(","):
            out = os.path.join(d, f"{mode}.json")
            cmd = [sys.executable, __file__, "--engine-mode", mode, "--out", out,
                   "--num-prompts", str(args.num_prompts)]
            t = time.perf_counter()
            rc = subprocess.run(cmd).returncode
            print(f"[{mode}] finished rc={rc} in {time.perf_counter() - t:.0f} s", flush=True)
            if rc == 0 and os.path.exists(out):
                with open(out) as f:
                    rows.append(json.load(f))
            else:
                ok = False
    print("\n== results (Llama-3.1-8B shape, dummy weights; vLLM 0.26 same H200: bf16 200.9 / 16.1k, "
          "fp8 283.4 / 18.7k, AWQ 251.6 / 17.0k) ==")
    print(f"{'mode':6s} {'latency-1 tok/s':>16s} {'decode out tok/s':>17s} {'prompts':>8s} {'weights GiB':>12s} "
          f"{'peak GiB':>9s} {'KV blocks':>10s} {'start s':>8s}")
    for r in rows:
        print(f"{r['mode']:6s} {r['latency1_tok_s']:16.1f} {r['decode_out_tok_s']:17.0f} {r['decode_prompts']:8d} "
              f"{r['weights_gib']:12.2f} {r['peak_gib']:9.1f} {r['kv_blocks']:10d} {r['startup_s']:8.0f}")
    print("KERNELS", "ok" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
