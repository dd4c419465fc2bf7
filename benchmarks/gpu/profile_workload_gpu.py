"""Where a throughput workload's steps go: the engine's step loop timed step by step, with one profiled window.

    python3 benchmarks/gpu/profile_workload_gpu.py -tp 2 --workload decode     # nvidia-h200-x2, ~2 minutes

Runs DESIGN.md's throughput-decode (N x 128/1024) or throughput-prefill (N x 1024/128) workload through
``LLMEngine.step()`` directly, so each step's wall time can be tied to what it ran (decode rows, prefill
tokens). Steps are grouped by kind and batch size; a window of steps in the steady part is profiled on
every rank (device-kernel time, launches, top kernels) and cProfiled in the engine process (host time),
which separates a GPU-bound step from a host-bound one. A table comes last.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aphrodite.distributed.parallel_state import disable_nvlink_multicast  # noqa: E402

disable_nvlink_multicast()   # NVLink multicast stays off in this process and the ranks it starts

WORKLOADS = {"decode": (128, 1024), "prefill": (1024, 128)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="decode")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None, help="shorten the decode workload")
    parser.add_argument("--profile-at", type=float, default=0.4, help="fraction of the steps before the window")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--structured", action="store_true",
                        help="constrain every request by bench_structured_gpu's JSON schema (needs xgrammar)")
    args = parser.parse_args()

    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.model_shapes import write_model_shape

    in_len, out_len = WORKLOADS[args.workload]
    out_len = args.output_len or out_len
    extra = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    with tempfile.TemporaryDirectory() as d:
        path = write_model_shape(args.shape, d)
        sample = dict(temperature=args.temperature, seed=0, ignore_eos=True, max_tokens=out_len, detokenize=False)
        if args.structured:     # a tokenizer for xgrammar, and a schema no output completes (see that script)
            from bench_structured_gpu import SCHEMA, write_tokenizer

            from aphrodite.sampling_params import StructuredOutputsParams
            write_tokenizer(d, pad_to=json.loads((Path(path) / "config.json").read_text())["vocab_size"])
            sample["structured_outputs"] = StructuredOutputsParams(json=SCHEMA)
        t0 = time.perf_counter()
        llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=not args.structured,
                  tensor_parallel_size=args.tensor_parallel_size, **extra)
        ready = time.perf_counter() - t0
        engine = llm.llm_engine
        params = SamplingParams(**sample)
        if args.structured:
            engine.compile_structured_outputs([params])
        # warm-up: a short run of the same shape, so compiles and graph captures are out of the way
        warm = [{"prompt_token_ids": [(i * 7919 + j * 31) % 30000 + 100 for j in range(in_len)]} for i in range(64)]
        llm.generate(warm, SamplingParams(**{**sample, "max_tokens": 8}), use_tqdm=False)
        for i in range(args.num_prompts):
            ids = [(i * 104729 + j * 7919 + 17) % 30000 + 100 for j in range(in_len)]
            engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
        expected_steps = out_len + (args.num_prompts * in_len) // 16384 + 2
        start_prof = int(expected_steps * args.profile_at)
        steps: list[tuple[float, int, int]] = []   # (seconds, waiting, running) after the step
        scheduled: list[tuple[int, int, int, int]] = []     # each schedule's (tokens, rows, decodes, preempted)
        schedule = engine.scheduler.schedule

        def counted_schedule():
            out = schedule()
            scheduled.append((sum(out.num_tokens), len(out.requests), out.num_tokens.count(1), out.num_preempted))
            return out
        engine.scheduler.schedule = counted_schedule
        prof_host = cProfile.Profile()
        summaries = None
        t_all = time.perf_counter()
        step_i = 0
        while engine.has_unfinished_requests():
            if step_i == start_prof:
                llm.start_profile()
                prof_host.enable()
            t = time.perf_counter()
            engine.step(finished_only=True)
            dt = time.perf_counter() - t
            steps.append((dt, len(engine.scheduler.waiting), len(engine.scheduler.running)))
            step_i += 1
            if step_i == start_prof + args.profile_steps:
                prof_host.disable()
                summaries = llm.stop_profile()
        total = time.perf_counter() - t_all
        engine.shutdown()

    out_tokens = args.num_prompts * out_len
    all_tokens = args.num_prompts * (in_len + out_len)
    print(f"ready {ready:.1f} s; {len(steps)} steps in {total:.2f} s; "
          f"{out_tokens / total:,.0f} out tok/s, {all_tokens / total:,.0f} total tok/s")
    print(f"computed {sum(x[0] for x in scheduled):,} tokens (the prompts and outputs: {all_tokens:,}), "
          f"{sum(x[3] for x in scheduled)} preemptions, {len(scheduled)} schedules")
    slow = sorted(range(len(steps)), key=lambda i: -steps[i][0])[:8]
    print("slowest steps (ms: tokens/rows/decodes of that call's schedule): " + ", ".join(
        f"#{i} {steps[i][0] * 1e3:.0f}: {'/'.join(map(str, scheduled[i][:3]))}" for i in sorted(slow)
        if i < len(scheduled)))
    buckets: dict[tuple[bool, int], list[float]] = defaultdict(list)
    for dt, waiting, running in steps:   # steps with prompts still waiting are mixed prefill steps
        buckets[(waiting > 0, min(running // 128 * 128, 1024))].append(dt)
    print("\n| prompts waiting | running seqs (bucket) | steps | mean ms | median ms | max ms |")
    print("|---|---|---|---|---|---|")
    for key in sorted(buckets):
        xs, (mixed, b) = sorted(buckets[key]), key
        print(f"| {'yes' if mixed else 'no'} | {b}-{b + 127} | {len(xs)} | {sum(xs) / len(xs) * 1e3:.2f} | "
              f"{xs[len(xs) // 2] * 1e3:.2f} | {xs[-1] * 1e3:.2f} |")
    if summaries:
        print(f"\n===== profiled window: steps {start_prof}..{start_prof + args.profile_steps}")
        for s in summaries:
            print(s)
        buf = io.StringIO()
        pstats.Stats(prof_host, stream=buf).sort_stats("tottime").print_stats(15)
        print("===== engine host cProfile over the window\n" + "\n".join(buf.getvalue().splitlines()[:35]))
    lens = sorted(dt for dt, *_ in steps)
    print(f"\nRESULT tp={args.tensor_parallel_size} workload={args.workload} prompts={args.num_prompts} "
          f"temperature={args.temperature} structured={args.structured} "
          f"max_num_seqs={args.max_num_seqs or 'default'} out_tok_s={out_tokens / total:.0f} "
          f"total_tok_s={all_tokens / total:.0f} steps={len(steps)} median_step_ms={lens[len(lens) // 2] * 1e3:.2f}")


if __name__ == "__main__":
    main()
