"""A/B of the 64 x 128/128 throughput shape on a shared machine: configurations run alternately, each in
its own process, and are compared by the CPU time of the generate() call on one thread.

``aphrodite bench throughput`` measures wall-clock time with two OpenMP threads; on the shared 2-core
CI machine other processes' load swings it 2-10x (each kernel's barrier waits for a descheduled
thread). One thread's CPU time barely moves with load, so interleaved runs give stable ratios:

    OMP_NUM_THREADS=1 python benchmarks/cpu/ab_throughput.py --rounds 3

Each configuration is ``name=KEY:VALUE,...`` with LLM keyword arguments and ``env.NAME`` environment
variables, e.g. ``gguf-exact=dtype:bfloat16,env.APHRODITE_GGUF_Q8_ACTIVATIONS:0``. The workload is
``aphrodite bench throughput``'s: random token-id prompts, ignore_eos, temperature 1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_CONFIGS = ("gguf-bf16=dtype:bfloat16", "dense-bf16=dtype:bfloat16,quantization:none")


def child(spec: dict, num_prompts: int, input_len: int, output_len: int) -> None:
    import numpy as np

    from aphrodite import LLM, SamplingParams
    llm = LLM(skip_tokenizer_init=True, device="cpu", **spec)
    vocab = llm.llm_engine.config.model.hf_config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, input_len).tolist()} for _ in range(num_prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up (first-use builds)
    cpu, wall = time.thread_time(), time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"cpu_s": cpu, "wall_s": wall, "out_tokens": out_tokens}), flush=True)


def parse(config: str) -> tuple[str, dict, dict]:
    name, _, rest = config.partition("=")
    spec, env = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition(":")
        if key.startswith("env."):
            env[key[4:]] = value
        else:
            spec[key] = value
    return name, spec, env


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child), args.num_prompts, args.input_len, args.output_len)
        return
    configs = [parse(c) for c in args.configs]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):
        for name, spec, env in configs:
            cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--num-prompts", str(args.num_prompts),
                   "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[7:]) | {"load": load}
            results[name].append(res)
            rate = res["out_tokens"] / res["cpu_s"]
            print(f"round {r + 1} {name:16s} cpu {res['cpu_s']:7.2f} s ({rate:6.1f} out tok per CPU-s)  "
                  f"wall {res['wall_s']:7.2f} s  load {load:.1f}", flush=True)
    base = configs[-1][0]
    best = {name: min(x["cpu_s"] for x in rs) for name, rs in results.items()}
    print(f"\nbest of {args.rounds}, thread CPU time of generate(), {args.num_prompts} x "
          f"{args.input_len}/{args.output_len}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for name, _, _ in configs:
        toks = results[name][0]["out_tokens"]
        print(f"  {name:16s} {best[name]:7.2f} s  {toks / best[name]:7.1f} out tok/CPU-s  "
              f"{best[base] / best[name]:5.2f}x {base}")


if __name__ == "__main__":
    main()
