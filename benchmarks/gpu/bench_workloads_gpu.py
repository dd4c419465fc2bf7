"""DESIGN.md's three workloads in one engine, to spend one start-up instead of three on the device.

    python3 benchmarks/gpu/bench_workloads_gpu.py -tp 2 [--temperature 0] [--shape llama-3.1-8b]

The same requests as ``aphrodite bench latency`` (1 x 128 in / 256 out, 2 warm-up and 5 timed
iterations, prefix caching off so the repeats prefill again) and ``aphrodite bench throughput``
(1000 x 1024/128 "prefill", 1000 x 128/1024 "decode"; random token ids, ignore_eos), greedy by
default as vLLM's reference numbers were taken. Prints vLLM-style lines, then a table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aphrodite.distributed.parallel_state import disable_nvlink_multicast  # noqa: E402

disable_nvlink_multicast()   # NVLink multicast stays off in this process and the ranks it starts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--latency-output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's (vLLM's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    args = parser.parse_args()

    import tempfile

    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.common import random_token_prompts
    from aphrodite.benchmarks.model_shapes import write_model_shape

    with tempfile.TemporaryDirectory() as d:
        path = write_model_shape(args.shape, d)
        t0 = time.perf_counter()
        llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True,
                  tensor_parallel_size=args.tensor_parallel_size, enable_prefix_caching=False,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
        ready = time.perf_counter() - t0
        print(f"Engine start-up: {ready:.2f} s", flush=True)
        vocab = llm.llm_engine.config.model.hf_config.vocab_size

        def params(n_out: int) -> SamplingParams:
            return SamplingParams(temperature=args.temperature, top_p=1.0, max_tokens=n_out, ignore_eos=True,
                                  detokenize=False)

        def run(prompts: list[list[int]], n_out: int) -> tuple[float, int]:
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params(n_out), use_tqdm=False)
            return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

        one = random_token_prompts(1, 128, vocab, 0)
        n_lat = args.latency_output_len
        for _ in range(2):
            run(one, n_lat)
        lat = [run(one, n_lat)[0] for _ in range(5)]
        avg = sum(lat) / len(lat)
        print(f"Avg latency: {avg} seconds\nOutput token throughput: {n_lat / avg:.2f} tokens/s", flush=True)
        rows = {"latency-1 out tok/s": n_lat / avg}
        run(random_token_prompts(min(32, args.num_prompts), 1024, vocab, 1), 16)   # warm batched shapes, untimed
        for name, (n_in, n_out) in {"prefill": (1024, 128), "decode": (128, 1024)}.items():
            prompts = random_token_prompts(args.num_prompts, n_in, vocab, 2 if name == "prefill" else 3)
            secs, gen = run(prompts, n_out)
            total = args.num_prompts * n_in + gen
            print(f"[{name} {args.num_prompts} x {n_in}/{n_out}] Throughput: {args.num_prompts / secs:.2f} "
                  f"requests/s, {total / secs:.2f} total tokens/s, {gen / secs:.2f} output tokens/s", flush=True)
            rows[f"{name} total tok/s"] = total / secs
            rows[f"{name} out tok/s"] = gen / secs
        llm.llm_engine.shutdown()
    print(f"\n| TP={args.tensor_parallel_size} {args.shape} temp {args.temperature} | value |\n|---|---|")
    print(f"| ready s | {ready:.1f} |")
    for k, v in rows.items():
        print(f"| {k} | {v:,.1f} |")


if __name__ == "__main__":
    main()
