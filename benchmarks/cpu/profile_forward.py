"""CPU time of one batch-1 decode step's model forward (+ LM head), split by kernel; A/B-friendly.

``aphrodite bench latency`` on a shared 2-core machine swings by 2-10x with other processes'
load (two OpenMP threads wait on each other at every kernel). This captures one decode step of
the default model (position ~220) and re-runs its forward many times on one thread, timing
with the thread's CPU clock, so two builds can be compared in interleaved runs:

    OMP_NUM_THREADS=1 python benchmarks/cpu/profile_forward.py [--dtype bfloat16] [--quantization none]

``--batch 64`` captures a decode step of 64 sequences instead (the 64 x 128/128 throughput shape).

Without OMP_NUM_THREADS=1 it reports wall-clock time instead (for a quiet machine).
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import time

import numpy as np
import torch

import aphrodite.kernels.cpu.gguf_ops as gguf_ops
import aphrodite.kernels.cpu.ops as cpu_ops
import aphrodite.kernels.cpu.packed_linear as packed_linear
import aphrodite.modeling.layers.quantization.gguf_decode as gguf_decode
from aphrodite import LLM, SamplingParams
from aphrodite.modeling.layers.attention import get_attention_metadata, set_attention_metadata

TIMES: dict[str, float] = collections.defaultdict(float)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default=None, help="none: dequantize the GGUF at load")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="decode rows of the captured step")
    args = p.parse_args()
    one_thread = os.environ.get("OMP_NUM_THREADS") == "1"
    clock = time.thread_time if one_thread else time.perf_counter
    kwargs = {} if args.quantization is None else {"quantization": args.quantization}
    llm = LLM(dtype=args.dtype, skip_tokenizer_init=True, **kwargs)
    runner = next(o for o in gc.get_objects() if type(o).__name__ == "ModelRunner")
    captured = {}
    forward = runner.model.forward

    def capture(ids, pos, *rest):
        if ids.shape[0] == args.batch and not captured and int(pos[0]) > 200:
            captured["step"] = (ids.clone(), pos.clone(), get_attention_metadata())
        return forward(ids, pos, *rest)
    runner.model.forward = capture
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, 49152, 128).tolist()} for _ in range(args.batch)]
    llm.generate(prompts, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
    runner.model.forward = forward
    ids, pos, meta = captured["step"]

    def timed(owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                TIMES[label] += clock() - t
        setattr(owner, name, wrapper)
    timed(gguf_ops, "linear", "gguf matmul")
    timed(gguf_ops.LinearCall, "__call__", "gguf matmul")
    timed(gguf_ops, "dequantize", "gguf dequantize")
    timed(gguf_decode._Plan, "run", "C decoder stack (all)")
    timed(packed_linear, "linear", "dense matmul (oneDNN, packed)")
    for name in ("linear", "paged_decode_attention", "rms_norm", "silu_and_mul", "rope_write_kv"):
        timed(cpu_ops, name, name if name != "linear" else "dense matmul")

    def run(n: int) -> None:
        with torch.inference_mode(), set_attention_metadata(meta):
            for _ in range(n):
                runner.model.compute_logits(runner.model(ids, pos))
    run(3)
    best = None
    for _ in range(args.reps):
        TIMES.clear()
        t = clock()
        run(5)
        total = (clock() - t) / 5
        if best is None or total < best[0]:
            best = (total, {k: v / 5 for k, v in TIMES.items()})
    total, parts = best
    print(f"forward + LM head: {total * 1e3:.2f} ms ({'thread CPU time' if one_thread else 'wall'}, {args.dtype}, "
          f"quantization {args.quantization or 'gguf'}, batch {args.batch}, load {os.getloadavg()[0]:.1f})")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:24s} {v * 1e3:7.2f} ms")
    print(f"  {'the rest (Python)':24s} {(total - sum(parts.values())) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
