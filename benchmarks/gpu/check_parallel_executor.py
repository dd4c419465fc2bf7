"""The multi-GPU executors on 2 GPUs (device kind nvidia-h200-x2): correctness, overhead, failure.

1. A tiny random Llama in fp32: greedy tokens of 16 mixed-length prompts with TP=2 (mp executor,
   NCCL, CUDA graphs, async scheduling) and with PP=2 (two stages, micro-batches in flight) equal
   one GPU's, token for token.
2. Per-step cost of the executor: batch-1 decode time per token with TP=1 (in process) and TP=2
   on the same tiny model, where the model's own GPU work is negligible, so the difference is the
   step broadcast, the all-reduces and the result hand-back.
3. Failure: SIGKILL of one TP=2 worker mid-generation makes ``generate`` raise, within seconds.
4. The step broadcast alone (shared-memory ring vs. one pipe per rank), readers spinning as on GPUs.

    python benchmarks/gpu/check_parallel_executor.py
"""
from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import threading
import time

import torch

ENGINE = dict(dtype="float32", max_model_len=512, skip_tokenizer_init=True, gpu_memory_utilization=0.3)


def tiny_checkpoint(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                      initializer_range=0.05, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)


def greedy(llm, prompts: list[list[int]]) -> list[list[int]]:
    from aphrodite import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def decode_ms_per_token(llm) -> float:
    from aphrodite import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": list(range(3, 131))}], params, use_tqdm=False)   # warm-up
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": list(range(3, 131))}], params, use_tqdm=False)
    return (time.perf_counter() - t) / 256 * 1e3


def main() -> int:
    from aphrodite import LLM, SamplingParams
    from aphrodite.executor.base import ExecutorDeadError
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[tuple[str, str]] = []
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tiny_checkpoint(d)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(3, 300))] for _ in range(16)]

        t = time.perf_counter()
        one = LLM(d, **ENGINE)
        rows.append(("TP=1 ready (s)", f"{time.perf_counter() - t:.1f}"))
        want = greedy(one, prompts)
        ms1 = decode_ms_per_token(one)
        del one
        torch.cuda.empty_cache()

        for name, kw in (("TP=2", dict(tensor_parallel_size=2)), ("PP=2", dict(pipeline_parallel_size=2))):
            t = time.perf_counter()
            llm = LLM(d, **kw, **ENGINE)
            rows.append((f"{name} ready (s)", f"{time.perf_counter() - t:.1f}"))
            got = greedy(llm, prompts)
            same = sum(g == w for g, w in zip(got, want))
            rows.append((f"{name} greedy == TP=1 (prompts)", f"{same}/16"))
            ok &= same == 16
            ms = decode_ms_per_token(llm)
            rows.append((f"{name} batch-1 decode ms/token (TP=1: {ms1:.3f})", f"{ms:.3f}"))
            if name == "TP=2":
                executor = llm.llm_engine.executor
                victim = executor.procs[1].pid
                threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
                params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True, detokenize=False)
                t = time.perf_counter()
                try:
                    for _ in range(100):
                        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                    raised = "no"
                    ok = False
                except ExecutorDeadError as e:
                    raised = f"yes, {time.perf_counter() - t - 1.0:.2f} s after the kill: {str(e)[:60]}"
                rows.append(("TP=2 killed worker -> generate raises", raised))
            llm.llm_engine.shutdown()
            del llm
            torch.cuda.empty_cache()

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cpu"))
    from step_broadcast import bench_pipes, bench_shm, decode_plan
    for batch in (1, 256):
        plans = [decode_plan(batch, s) for s in range(2000)]
        w, r = bench_shm(2, plans, 0.05)
        pw, pr = bench_pipes(2, plans)
        rows.append((f"step broadcast, decode batch {batch}: shm write / all read (us)", f"{w:.1f} / {r:.1f}"))
        rows.append(("  baseline, a pipe per rank: write / all read (us)", f"{pw:.1f} / {pr:.1f}"))

    print(f"\nParallel executors on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("RESULT:", "OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
