"""Where a batch-1 prefill's time goes on the GPU (first-token latency): Llama-3.1-8B shape, dummy
weights, 128-token prompts, ``max_tokens=1``, prefix caching off (a cache hit would skip the prefill).

Prints wall time per request, GPU-busy time (sum of kernel times), the kernel count, and the top
kernels and CPU ops, so the gap between wall and GPU time (launches, host work, syncs) shows.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from aphrodite import LLM, SamplingParams
from aphrodite.benchmarks.model_shapes import write_model_shape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = write_model_shape(args.shape, d)
        llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=False,
                  tensor_parallel_size=args.tp)
        sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

        def prompt(i: int) -> dict:
            return {"prompt_token_ids": [(1000 + 7 * i + j) % 30000 for j in range(args.prompt_len)]}

        for i in range(5):
            llm.generate(prompt(i), sp, use_tqdm=False)
        torch.cuda.synchronize()
        times = []
        for i in range(args.iters):
            t = time.perf_counter()
            llm.generate(prompt(100 + i), sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        times.sort()
        med = times[len(times) // 2]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                llm.generate(prompt(200 + i), sp, use_tqdm=False)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / 5
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / 5
        print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
        print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
        print(f"PREFILL {args.shape} tp={args.tp} prompt {args.prompt_len}: wall median {med * 1e3:.2f} ms "
              f"(min {times[0] * 1e3:.2f}); GPU kernel time {gpu:.2f} ms; {kernels:.0f} kernels per request")


if __name__ == "__main__":
    main()
