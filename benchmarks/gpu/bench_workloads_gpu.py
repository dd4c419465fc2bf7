"""DESIGN.md's three workloads in one engine, to spend one start-up instead of three on the device.

    python3 benchmarks/gpu/bench_workloads_gpu.py -tp 2 [--temperature 0] [--shape llama-3.1-8b]
    python3 benchmarks/gpu/bench_workloads_gpu.py -tp 2 --workloads prefill --tp-overlap 0,8192,0

The same requests as ``aphrodite bench latency`` (1 x 128 in / 256 out, 2 warm-up and 5 timed
iterations, prefix caching off so the repeats prefill again) and ``aphrodite bench throughput``
(1000 x 1024/128 "prefill", 1000 x 128/1024 "decode"; random token ids, ignore_eos), greedy by
default as vLLM's reference numbers were taken. Prints vLLM-style lines, then a table.

``--tp-overlap A,B``: the throughput workloads once per value of the smallest step run as two overlapped
halves (``Worker.tp_overlap``; 0 = off), in one engine; the table then also gives, for every value after
the first, the share of requests whose greedy tokens equal the first value's run and the mean index of
the first differing token (bf16 GEMMs of other row counts may round differently). The first timed run may
still pay first-use kernel compiles: compare the later runs (e.g. ``0,8192,0``).
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
    parser.add_argument("--workloads", default="latency,prefill,decode", help="comma-separated subset")
    parser.add_argument("--tp-overlap", default=None, help="comma-separated thresholds (tokens; 0 = off)")
    args = parser.parse_args()
    workloads = set(args.workloads.split(","))
    overlaps = [None] if args.tp_overlap is None else [int(v) for v in args.tp_overlap.split(",")]

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

        def run(prompts: list[list[int]], n_out: int) -> tuple[float, list[list[int]]]:
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params(n_out), use_tqdm=False)
            return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]

        rows: dict[str, float] = {}
        if "latency" in workloads:
            one = random_token_prompts(1, 128, vocab, 0)
            n_lat = args.latency_output_len
            for _ in range(2):
                run(one, n_lat)
            lat = [run(one, n_lat)[0] for _ in range(5)]
            avg = sum(lat) / len(lat)
            print(f"Avg latency: {avg} seconds\nOutput token throughput: {n_lat / avg:.2f} tokens/s", flush=True)
            rows["latency-1 out tok/s"] = n_lat / avg
        warm = random_token_prompts(min(32, args.num_prompts), 1024, vocab, 1)
        for overlap in overlaps:    # warm batched shapes (whole and halved steps), untimed
            if overlap is not None:
                llm.collective_rpc("tp_overlap", overlap)
            run(warm, 16)
        for name, (n_in, n_out) in {"prefill": (1024, 128), "decode": (128, 1024)}.items():
            if name not in workloads:
                continue
            prompts = random_token_prompts(args.num_prompts, n_in, vocab, 2 if name == "prefill" else 3)
            first = None
            for overlap in overlaps:
                tag = name if overlap is None else f"{name} overlap>={overlap}"
                if overlap is not None:
                    llm.collective_rpc("tp_overlap", overlap)
                secs, tokens = run(prompts, n_out)
                gen = sum(len(t) for t in tokens)
                total = args.num_prompts * n_in + gen
                print(f"[{tag} {args.num_prompts} x {n_in}/{n_out}] Throughput: {args.num_prompts / secs:.2f} "
                      f"requests/s, {total / secs:.2f} total tokens/s, {gen / secs:.2f} output tokens/s", flush=True)
                rows[f"{tag} total tok/s"] = total / secs
                rows[f"{tag} out tok/s"] = gen / secs
                if overlap is not None:
                    rows[f"{tag}: steps run overlapped so far (rank 0)"] = llm.collective_rpc("tp_overlap")[0][1]
                if first is None:
                    first = tokens
                else:
                    diverge = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                               for a, b in zip(first, tokens)]
                    rows[f"{tag}: requests equal to the first run"] = sum(a == b for a, b in zip(first, tokens))
                    rows[f"{tag}: mean first differing token"] = sum(diverge) / len(diverge)
        llm.llm_engine.shutdown()
    print(f"\n| TP={args.tensor_parallel_size} {args.shape} temp {args.temperature} | value |\n|---|---|")
    print(f"| ready s | {ready:.1f} |")
    for k, v in rows.items():
        print(f"| {k} | {v:,.1f} |")


if __name__ == "__main__":
    main()
