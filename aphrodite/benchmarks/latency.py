"""``aphrodite bench latency``: end-to-end latency of one batch, repeated.

Flags and printed lines follow ``vllm bench latency``; it also prints the output token rate
and the time per output token, the figures of DESIGN.md's latency-1 workload
(``--batch-size 1 --input-len 128 --output-len 256``).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from aphrodite.benchmarks import common

PERCENTAGES = (10, 25, 50, 75, 90, 99)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=32, help="Prompt length in tokens.")
    parser.add_argument("--output-len", type=int, default=128, help="Output length in tokens.")
    parser.add_argument("--batch-size", type=int, default=8, help="Number of requests in the batch.")
    parser.add_argument("--num-iters-warmup", type=int, default=10, help="Untimed iterations first.")
    parser.add_argument("--num-iters", type=int, default=30, help="Timed iterations.")
    common.add_sampling_args(parser)
    common.add_baseline_args(parser)
    parser.add_argument("--hf-num-iters", type=int, default=None,
                        help="Timed iterations of the HF baseline (default: --num-iters).")
    parser.add_argument("--hf-num-iters-warmup", type=int, default=None,
                        help="Warm-up iterations of the HF baseline (default: --num-iters-warmup).")
    common.add_engine_args(parser)
    # The same prompts run again and again: a prefix cache hit would skip their prefill.
    parser.set_defaults(enable_prefix_caching=False)


def _measure(run: Callable[[], int], warmup: int, iters: int, label: str) -> tuple[list[float], int]:
    """Latencies of ``iters`` timed calls after ``warmup`` untimed ones, and the tokens of the last."""
    from tqdm.auto import tqdm
    print(f"Warming up{label}...", flush=True)
    for _ in tqdm(range(warmup), desc="Warmup iterations"):
        run()
    latencies: list[float] = []
    generated = 0
    for _ in tqdm(range(iters), desc="Bench iterations"):
        start = time.perf_counter()
        generated = run()
        latencies.append(time.perf_counter() - start)
    return latencies, generated


def _summary(latencies: list[float], output_len: int, tokens_per_iter: int) -> dict[str, Any]:
    import numpy as np
    lat = np.asarray(latencies)
    avg = float(lat.mean())
    return {
        "avg_latency": avg,
        "std_latency": float(lat.std()),
        "latencies": lat.tolist(),
        "percentiles": {p: float(v) for p, v in zip(PERCENTAGES, np.percentile(lat, PERCENTAGES))},
        "output_tokens_per_iteration": tokens_per_iter,
        "output_tokens_per_second": tokens_per_iter / avg,
        # One decode step of the batch: what a user of one stream waits per token.
        "ms_per_output_token": avg * 1000 / output_len,
    }


def _print_summary(s: dict[str, Any], prefix: str = "") -> None:
    print(f"{prefix}Avg latency: {s['avg_latency']} seconds")
    print(f"{prefix}Std latency: {s['std_latency']} seconds")
    for p, v in s["percentiles"].items():
        print(f"{prefix}{p}% percentile latency: {v} seconds")
    print(f"{prefix}Output token throughput: {s['output_tokens_per_second']:.2f} tokens/s")
    print(f"{prefix}Time per output token: {s['ms_per_output_token']:.2f} ms", flush=True)


def _validate(args: argparse.Namespace) -> None:
    for name in ("batch_size", "n", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.num_iters_warmup < 0:
        raise ValueError("--num-iters-warmup must be at least 0.")
    if args.hf_num_iters is not None and args.hf_num_iters < 1:
        raise ValueError("--hf-num-iters must be at least 1.")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print vLLM's lines and return the results (also written by --output-json)."""
    _validate(args)
    with common.ModelShape(args):
        llm, startup = common.start_engine(args)
        model = common.resolved_model(llm)
        common.check_lengths(model, args.input_len, args.output_len)
        seed = getattr(args, "seed", 0)
        prompts = common.random_token_prompts(args.batch_size, args.input_len, model.hf_config.vocab_size, seed)
        requests = [{"prompt_token_ids": p} for p in prompts]
        params = common.workload_params(args, model)

        def run() -> int:
            return common.count_tokens(llm.generate(requests, params, use_tqdm=False))[1]

        latencies, generated = _measure(run, args.num_iters_warmup, args.num_iters, "")
        expected = args.batch_size * args.n * args.output_len
        if generated != expected:
            print(f"WARNING: an iteration produced {generated} output tokens, expected {expected}.")
        results = _summary(latencies, args.output_len, generated)
        results["engine_startup_s"] = startup
        _print_summary(results)

        if args.baseline == "hf":
            del llm, run
            common.free_device_memory()
            hf = _run_hf(args, model, prompts, seed)
            common.record_speedup(results, hf, hf["avg_latency"] / results["avg_latency"])

    if args.output_json:
        common.write_json(args.output_json, results)
    return results


def _run_hf(args: argparse.Namespace, model: common.ResolvedModel, prompts: list[list[int]],
            seed: int) -> dict[str, Any]:
    from aphrodite.benchmarks.hf_baseline import HFRunner
    runner = HFRunner(model, args.temperature, seed)
    warmup = args.num_iters_warmup if args.hf_num_iters_warmup is None else args.hf_num_iters_warmup
    iters = args.hf_num_iters or args.num_iters
    runner.warmup(prompts[0])
    latencies, generated = _measure(lambda: runner.generate(prompts, args.output_len, args.n), warmup, iters,
                                    " HF baseline")
    hf = _summary(latencies, args.output_len, generated)
    hf["load_s"] = runner.load_seconds
    _print_summary(hf, prefix="HF baseline ")
    return hf
