"""``aphrodite bench throughput``: offline throughput of a batch of random prompts.

Flags and printed lines follow ``vllm bench throughput`` so the numbers compare directly.
Only ``generate()`` is timed; engine start-up is reported on its own line.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from aphrodite.benchmarks import common


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-name", choices=["random"], default="random",
                        help="Prompt source: random token ids of exactly --input-len tokens.")
    parser.add_argument("--input-len", type=int, default=1024, help="Prompt length in tokens of each request.")
    parser.add_argument("--output-len", type=int, default=128, help="Output length in tokens of each request.")
    parser.add_argument("--num-prompts", type=int, default=1000, help="Number of prompts to process.")
    common.add_sampling_args(parser)
    common.add_baseline_args(parser)
    parser.add_argument("--hf-num-prompts", type=int, default=None,
                        help="Run the HF baseline on the first K prompts only (its rates are per its own run).")
    parser.add_argument("--hf-batch-size", "--hf-max-batch-size", dest="hf_batch_size", type=int, default=None,
                        help="Batch size of the HF baseline (default: all of its prompts in one padded batch).")
    common.add_engine_args(parser)


def _rates(num_requests: int, prompt_tokens: int, output_tokens: int, seconds: float) -> dict[str, Any]:
    total = prompt_tokens + output_tokens
    return {
        "elapsed_time": seconds,
        "num_requests": num_requests,
        "total_num_tokens": total,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_second": num_requests / seconds,
        "tokens_per_second": total / seconds,
        "output_tokens_per_second": output_tokens / seconds,
    }


def _print_rates(r: dict[str, Any], prefix: str = "") -> None:
    print(f"{prefix}Throughput: {r['requests_per_second']:.2f} requests/s, "
          f"{r['tokens_per_second']:.2f} total tokens/s, "
          f"{r['output_tokens_per_second']:.2f} output tokens/s")
    print(f"{prefix}Total num prompt tokens:  {r['total_prompt_tokens']}")
    print(f"{prefix}Total num output tokens:  {r['total_output_tokens']}", flush=True)


def _validate(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.hf_num_prompts is not None and not 1 <= args.hf_num_prompts <= args.num_prompts:
        raise ValueError("--hf-num-prompts must be between 1 and --num-prompts.")
    if args.hf_batch_size is not None and args.hf_batch_size < 1:
        raise ValueError("--hf-batch-size must be at least 1.")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print vLLM's lines and return the results (also written by --output-json)."""
    _validate(args)
    with common.ModelShape(args):
        llm, startup = common.start_engine(args)
        model = common.resolved_model(llm)
        common.check_lengths(model, args.input_len, args.output_len)
        seed = getattr(args, "seed", 0)
        prompts = common.random_token_prompts(args.num_prompts, args.input_len, model.hf_config.vocab_size, seed)
        params = common.workload_params(args, model)

        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
        elapsed = time.perf_counter() - start
        prompt_tokens, output_tokens = common.count_tokens(outputs)
        results = _rates(len(outputs), prompt_tokens, output_tokens, elapsed)
        results["engine_startup_s"] = startup
        _print_rates(results)

        if args.baseline == "hf":
            del llm, outputs
            common.free_device_memory()
            hf = _run_hf(args, model, prompts, seed)
            common.record_speedup(results, hf, results["output_tokens_per_second"] / hf["output_tokens_per_second"])

    if args.output_json:
        common.write_json(args.output_json, results)
    return results


def _run_hf(args: argparse.Namespace, model: common.ResolvedModel, prompts: list[list[int]],
            seed: int) -> dict[str, Any]:
    from aphrodite.benchmarks.hf_baseline import HFRunner
    subset = prompts[:args.hf_num_prompts or len(prompts)]
    batch_size = args.hf_batch_size or len(subset)
    runner = HFRunner(model, args.temperature, seed)
    runner.warmup(subset[0])
    seconds, generated = runner.run_batches(subset, args.output_len, args.n, batch_size)
    hf = _rates(len(subset), sum(len(p) for p in subset), generated, seconds)
    hf.update(load_s=runner.load_seconds, batch_size=batch_size)
    _print_rates(hf, prefix="HF baseline ")
    return hf
