"""Sampler and structured-output cost on the CPU with the default model (issue 16).

1. Sampler: every sampler of the chain on (plus penalties, DRY and no_repeat_ngram on 256-token
   histories) at batch 64 over the model's vocabulary, ms per step, against the default model's
   greedy decode step at batch 64 (target: under a fifth of it).
2. Structured output: throughput-decode style run, 64 requests of 64 prompt tokens, every request
   JSON-schema constrained vs unconstrained (output tok/s; target: >= 90%).

    python benchmarks/cpu/bench_sampler_cpu.py [--requests 64] [--output-len 128] [--async-scheduling]
"""
from __future__ import annotations

import argparse
import time

import torch

from aphrodite import LLM, SamplingParams
from aphrodite.modeling.layers.sampler import Sampler
from aphrodite.sampling_params import StructuredOutputsParams
from aphrodite.worker.sampling_inputs import build_sampling_metadata
from aphrodite.worker.sampling_state import SamplingState

EVERYTHING = dict(temperature=0.9, dynatemp_min=0.6, dynatemp_max=1.2, top_p=0.95, top_k=200, min_p=0.02, top_a=0.05,
                  tfs=0.97, eta_cutoff=1e-4, epsilon_cutoff=1e-5, typical_p=0.98, smoothing_factor=0.1,
                  xtc_threshold=0.1, xtc_probability=0.5, nsigma=3.0, skew=0.2, repetition_penalty=1.1,
                  frequency_penalty=0.1, presence_penalty=0.1, dry_multiplier=0.8, no_repeat_ngram_size=4)
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
    "summary": {"type": "string", "minLength": 200, "maxLength": 400}},
    "required": ["title", "tags", "summary"], "additionalProperties": False}


class Row:
    def __init__(self, i: int, params: SamplingParams, prompt: list[int], out: list[int]) -> None:
        self.request_id, self.params, self.prompt_token_ids, self.output_token_ids = str(i), params, prompt, out
        self.sample_seed, self.eos_token_ids = i, (2,)

    @property
    def num_outputs_with_pending(self) -> int:
        return len(self.output_token_ids)


def sampler_ms(vocab: int, batch: int, steps: int = 6) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    rows = [Row(i, SamplingParams(seed=i, **EVERYTHING), torch.randint(0, vocab, (128,), generator=g).tolist(),
                torch.randint(0, vocab, (128,), generator=g).tolist()) for i in range(batch)]
    state = SamplingState(vocab, 512, torch.device("cpu"))
    logits = torch.randn(batch, vocab, generator=g) * 3
    sampler = Sampler()
    build, samp = [], []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        md = build_sampling_metadata(rows, vocab, torch.device("cpu"), state)
        t1 = time.perf_counter()
        out = sampler(logits, md)
        state.update([r.request_id for r in rows], out.token_ids)
        t2 = time.perf_counter()
        for r, t in zip(rows, out.token_ids.tolist()):
            r.output_token_ids.append(t)
        build.append((t1 - t0) * 1e3)
        samp.append((t2 - t1) * 1e3)
    return sorted(build[2:])[steps // 2], sorted(samp[2:])[steps // 2]


CLOCK = [time.perf_counter]     # --clock cpu: this process's CPU time (all its threads)


def run(llm: LLM, n: int, out_len: int, params: SamplingParams) -> tuple[float, int]:
    prompts = [{"prompt_token_ids": [1 + (i * 7 + j) % 1000 for j in range(64)]} for i in range(n)]
    t = CLOCK[0]()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = CLOCK[0]() - t
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--async-scheduling", action="store_true",
                    help="queue step N+1 before reading step N (off by default on the CPU)")
    ap.add_argument("--structured-only", action="store_true", help="only part 2")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: part 2 in process CPU seconds, which other processes on a shared machine inflate "
                         "less (with OMP_NUM_THREADS=1, no thread waits on a descheduled peer)")
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    llm = LLM(max_model_len=512, device="cpu", max_num_seqs=args.requests, async_scheduling=args.async_scheduling)
    vocab = llm.llm_engine.config.model.hf_config.vocab_size
    n, out_len = args.requests, args.output_len
    run(llm, 4, 8, SamplingParams(max_tokens=8))     # warm-up
    step_ms = samp = build = float("nan")
    if not args.structured_only:
        free_s, free_tok = run(llm, n, out_len, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
        step_ms = free_s / out_len * 1e3
        print(f"greedy run: {free_s:.1f} s for {free_tok} tokens -> {step_ms:.1f} ms per step", flush=True)
        build, samp = sampler_ms(vocab, n)
        print(f"every sampler: {samp:.1f} ms sampler + {build:.1f} ms input build per step", flush=True)
    so = SamplingParams(temperature=0.7, seed=0, max_tokens=out_len,
                        structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.llm_engine.compile_structured_outputs([so])   # compile once, outside the timing (it is cached)
    plain = SamplingParams(temperature=0.7, seed=0, max_tokens=out_len)
    p_s, p_tok = run(llm, n, out_len, plain)
    print(f"unconstrained: {p_tok} tokens in {p_s:.1f} s", flush=True)
    c_s, c_tok = run(llm, n, out_len, so)
    print(f"JSON-schema constrained: {c_tok} tokens in {c_s:.1f} s", flush=True)
    print()
    print(f"default model, batch {n}, vocab {vocab}, async scheduling {'on' if args.async_scheduling else 'off'}")
    print(f"{'measure':<46}{'value':>12}")
    label = f"decode step (greedy, batch {n}), ms"
    print(f"{label:<46}{step_ms:>12.1f}")
    print(f"{'every sampler: sampler ms / step':<46}{samp:>12.2f}")
    print(f"{'every sampler: input build ms / step':<46}{build:>12.2f}")
    print(f"{'every sampler / decode step':<46}{(samp + build) / step_ms:>12.3f}")
    print(f"{'unconstrained output tok/s':<46}{p_tok / p_s:>12.1f}")
    print(f"{'JSON-schema constrained output tok/s':<46}{c_tok / c_s:>12.1f}")
    print(f"{'constrained / unconstrained':<46}{(c_tok / c_s) / (p_tok / p_s):>12.3f}")


if __name__ == "__main__":
    main()
