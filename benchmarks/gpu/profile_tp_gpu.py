"""Where TP=2's time goes on 2 x H200, next to TP=1: Llama-3.1-8B shape, dummy weights.

    python3 benchmarks/gpu/profile_tp_gpu.py --tp 2 1     # nvidia-h200-x2, about 3 minutes

For each TP size, in its own process: batch-1 decode (128 in / 256 out) wall time per token, then
profiled windows on every rank (``LLM.start_profile``/``stop_profile``): device-kernel time,
launches and the top kernels of 64 decode steps; the same for a prefill window (64 fresh prompts of 1,024
tokens, one output token each: 8 full 8,192-token steps) and a batched window (256 prompts, 64 steps);
and the engine process's own host time per decode step (cProfile,
top functions), which async scheduling must keep under the device time. A table comes last.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aphrodite.distributed.parallel_state import disable_nvlink_multicast  # noqa: E402

disable_nvlink_multicast()   # NVLink multicast stays off in this process and the ranks it starts


PREFILL_LEN = int(os.environ.get("PREFILL_LEN", "1024"))
PREFILL_PROMPTS = int(os.environ.get("PREFILL_PROMPTS", "64"))
BATCH = int(os.environ.get("BATCH", "256"))


def one(tp: int, shape: str) -> dict:
    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.model_shapes import write_model_shape

    with tempfile.TemporaryDirectory() as d:
        path = write_model_shape(shape, d)
        t0 = time.perf_counter()
        llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True, tensor_parallel_size=tp)
        ready = time.perf_counter() - t0
        prompt = {"prompt_token_ids": list(range(1000, 1128))}
        greedy = dict(temperature=0, ignore_eos=True)
        llm.generate(prompt, SamplingParams(max_tokens=64, **greedy), use_tqdm=False)
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=256, **greedy), use_tqdm=False)
        per_token = (time.perf_counter() - t) / 256
        # host time of the engine process per decode step
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(prompt, SamplingParams(max_tokens=64, **greedy), use_tqdm=False)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
        host = "\n".join(s.getvalue().splitlines()[:40])
        llm.start_profile()
        llm.generate(prompt, SamplingParams(max_tokens=64, **greedy), use_tqdm=False)
        decode = llm.stop_profile()
        def fresh(n: int, length: int, seed: int) -> list[dict]:   # never a prefix-cache hit
            return [{"prompt_token_ids": [(seed * 104729 + i * 7919 + j * 31) % 30000 + 100 for j in range(length)]}
                    for i in range(n)]

        one_token = SamplingParams(max_tokens=1, **greedy)
        llm.generate(fresh(PREFILL_PROMPTS, PREFILL_LEN, 1), one_token, use_tqdm=False)
        t = time.perf_counter()
        llm.generate(fresh(PREFILL_PROMPTS, PREFILL_LEN, 2), one_token, use_tqdm=False)
        prefill_s = time.perf_counter() - t
        llm.start_profile()
        llm.generate(fresh(PREFILL_PROMPTS, PREFILL_LEN, 3), one_token, use_tqdm=False)
        prefill = llm.stop_profile()
        # batched decode: BATCH prompts of 128 tokens, 64 steps (the first steps prefill them)
        llm.generate(fresh(BATCH, 128, 4), SamplingParams(max_tokens=16, **greedy), use_tqdm=False)
        t = time.perf_counter()
        llm.generate(fresh(BATCH, 128, 5), SamplingParams(max_tokens=64, **greedy), use_tqdm=False)
        batch_s = time.perf_counter() - t
        llm.start_profile()
        llm.generate(fresh(BATCH, 128, 6), SamplingParams(max_tokens=64, **greedy), use_tqdm=False)
        batched = llm.stop_profile()
        for name, summaries in (("DECODE 64 steps", decode), (f"PREFILL {PREFILL_PROMPTS} x {PREFILL_LEN}", prefill),
                                (f"BATCH {BATCH} x 128 in / 64 out", batched)):
            for summary in summaries:
                print(f"===== TP={tp} {name} {summary}", flush=True)
        print(f"===== TP={tp} engine host cProfile, 64 decode steps\n{host}", flush=True)
        llm.llm_engine.shutdown()
    return {"tp": tp, "ready_s": ready, "ms_per_token": per_token * 1e3,
            "prefill_tok_s": PREFILL_PROMPTS * PREFILL_LEN / prefill_s,
            "batch_out_tok_s": BATCH * 64 / batch_s, "batch_kernel_ms": [x.kernel_s * 1e3 for x in batched],
            "batch_wall_ms": batched[0].wall_s * 1e3,
            "decode_kernel_ms": [x.kernel_s * 1e3 / 64 for x in decode],
            "decode_wall_ms": decode[0].wall_s * 1e3 / 64, "decode_launches": [x.kernels / 64 for x in decode],
            "prefill_kernel_ms": [x.kernel_s * 1e3 for x in prefill], "prefill_wall_ms": prefill[0].wall_s * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--child", type=int)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one(args.child, args.shape)), flush=True)
        return
    rows = []
    for tp in args.tp:
        proc = subprocess.run([sys.executable, __file__, "--child", str(tp), "--shape", args.shape],
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT")), flush=True)
        rows += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    print("\n| TP | ready s | decode ms/token | decode kernel ms/step (per rank) | launches/step | "
          "prefill tok/s | prefill kernel ms (per rank) / wall ms | batch out tok/s | batch kernel / wall ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['ready_s']:.1f} | {r['ms_per_token']:.2f} | "
              f"{' / '.join(f'{x:.2f}' for x in r['decode_kernel_ms'])} (wall {r['decode_wall_ms']:.2f}) | "
              f"{' / '.join(f'{x:.0f}' for x in r['decode_launches'])} | {r['prefill_tok_s']:,.0f} | "
              f"{' / '.join(f'{x:.1f}' for x in r['prefill_kernel_ms'])} / {r['prefill_wall_ms']:.1f} | "
              f"{r['batch_out_tok_s']:,.0f} | {' / '.join(f'{x:.1f}' for x in r['batch_kernel_ms'])} / "
              f"{r['batch_wall_ms']:.1f} |")


if __name__ == "__main__":
    main()
