"""Start-up on an empty Triton cache, as on a fresh machine: `LLM()` to ready, where it went, and a greedy check.

    TRITON_CACHE_DIR=$(mktemp -d) python3 benchmarks/gpu/check_cold_start.py [-tp N]
    TRITON_CACHE_DIR=$(mktemp -d) APHRODITE_PARALLEL_COMPILE=0 python3 benchmarks/gpu/check_cold_start.py

Prints the engine's start-up log (including ``aphrodite.kernels.precompile``'s lines: the dry pass, kernel
variants compiled ahead in parallel, and any that failed), then a per-phase table: every rank's start-up
phases (``Worker.startup_timeline``: process running, CUDA, joining the groups, loading, compiling ahead,
profiling, KV cache, graph capture) as seconds since `LLM()` was called and as each phase's own seconds,
the seconds to ready, and a hash of 32 greedy tokens for 4 prompts, which must be the same with and
without compiling ahead (the same kernels run).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aphrodite.distributed.parallel_state import disable_nvlink_multicast  # noqa: E402

disable_nvlink_multicast()   # NVLink multicast stays off in this process and the ranks it starts


class _Records(logging.Handler):
    """The engine process's log records, with their wall-clock times."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, f"{record.name.rsplit('.', 1)[-1]}: {record.getMessage()[:70]}"))


def phase_table(t0: float, ready_at: float, timelines: list[list[tuple[str, float]]],
                engine: list[tuple[float, str]]) -> str:
    """Rows 'phase | rank r: s since LLM() (its own s)', the engine process's log lines in between."""
    rows = ["| where | " + " | ".join(f"rank {r}: at s (phase s)" for r in range(len(timelines))) + " |",
            "|---|" + "---|" * len(timelines)]
    names = [name for name, _ in timelines[0]]
    for i, name in enumerate(names):
        cells = []
        for tl in timelines:
            if i < len(tl):
                prev = tl[i - 1][1] if i else t0
                cells.append(f"{tl[i][1] - t0:6.1f} ({tl[i][1] - prev:5.1f})")
            else:
                cells.append("-")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append(f"| ready (engine process) | {ready_at - t0:6.1f} |" + " |" * (len(timelines) - 1))
    lines = ["\n".join(rows), "", "engine process log (s since LLM()):"]
    lines += [f"  {at - t0:6.1f}  {msg}" for at, msg in engine]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--shape", default="llama-3.1-8b")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    logging.getLogger("aphrodite.kernels.precompile").setLevel(logging.DEBUG)
    records = _Records()
    logging.getLogger("aphrodite").addHandler(records)
    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.model_shapes import write_model_shape

    with tempfile.TemporaryDirectory() as d:
        path = write_model_shape(args.shape, d)
        t0_wall, t0 = time.time(), time.perf_counter()
        llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True,
                  tensor_parallel_size=args.tensor_parallel_size)
        ready = time.perf_counter() - t0
        ready_wall = time.time()
        timelines = llm.llm_engine.executor.collective_rpc("startup_timeline")
        prompts = [{"prompt_token_ids": [(i * 7919 + j * 31) % 30000 + 100 for j in range(64 + 32 * i)]}
                   for i in range(4)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        digest = hashlib.sha256(str([o.outputs[0].token_ids for o in outs]).encode()).hexdigest()[:16]
        llm.llm_engine.shutdown()
    engine_log = [(at, msg) for at, msg in records.records if at <= ready_wall]
    print("\n" + phase_table(t0_wall, ready_wall, timelines, engine_log))
    print(f"\nCOLD START tp={args.tensor_parallel_size} parallel_compile="
          f"{os.environ.get('APHRODITE_PARALLEL_COMPILE', '1')} ready {ready:.1f} s, greedy digest {digest}")


if __name__ == "__main__":
    main()
