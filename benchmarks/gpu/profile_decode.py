"""Where a decode step's time goes on the GPU: a model shape (default Llama-3.1-8B), dummy weights, batch 1.

Prints GPU-busy time per step (sum of kernel times), wall time per step, and the top kernels,
so a missed latency target can be explained (weight streaming vs launch gaps vs host work).

    python3 benchmarks/gpu/profile_decode.py [--shape gemma-2-9b]      # one H200, ~40 s
"""
from __future__ import annotations

import argparse
import tempfile
import time

from torch.profiler import ProfilerActivity, profile

from aphrodite import LLM, SamplingParams
from aphrodite.benchmarks.model_shapes import write_model_shape


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.1-8b")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = write_model_shape(args.shape, d)
        llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True)
        prompt = {"prompt_token_ids": list(range(1000, 1128))}
        sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        llm.generate(prompt, sp, use_tqdm=False)
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True), use_tqdm=False)
        wall = (time.perf_counter() - t) / 256
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompt, sp, use_tqdm=False)
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e3 / 64
        print(f"PROFILE wall per token {wall * 1e3:.2f} ms; GPU kernel time per step ~{gpu:.2f} ms")
        print(events.table(sort_by="self_device_time_total", row_limit=24, max_name_column_width=60))
        weights = sum(p.numel() * p.element_size() for p in llm.llm_engine.executor.runner.model.parameters())
        # One latency-1 request through LLMEngine.step() by hand: where a generate() call's time goes beyond
        # the decode steps (first token, the last steps, the call around them).
        engine = llm.llm_engine
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True), use_tqdm=False)
        gen_s = time.perf_counter() - t0
        engine.add_request("timeline", prompt, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True))
        marks, t0 = [], time.perf_counter()
        while engine.has_unfinished_requests():
            outs = engine.step()
            marks.append((time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)))
        gaps = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
        first = next(t for t, n in marks if n)
        print(f"TIMELINE {args.shape}: generate() {gen_s * 1e3:.1f} ms; by steps {marks[-1][0] * 1e3:.1f} ms in "
              f"{len(marks)} step() calls, first token out at {first * 1e3:.1f} ms; first calls "
              + ", ".join(f"{t * 1e3:.1f}" for t, _ in marks[:4])
              + f"; median gap {sorted(gaps)[len(gaps) // 2] * 1e3:.3f} ms; last gaps "
              + ", ".join(f"{g * 1e3:.1f}" for g in gaps[-3:]))
        print(f"RESULT {args.shape}: weights {weights / 1e9:.2f} GB, wall {wall * 1e3:.3f} ms/token "
              f"({weights / wall / 1e12:.2f} TB/s of weights), kernels {gpu:.3f} ms/step")


if __name__ == "__main__":
    main()
