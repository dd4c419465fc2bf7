"""Start-up on an empty Triton cache, as on a fresh machine: `LLM()` to ready, and a greedy check.

    TRITON_CACHE_DIR=$(mktemp -d) python3 benchmarks/gpu/check_cold_start.py [-tp N]
    TRITON_CACHE_DIR=$(mktemp -d) APHRODITE_PARALLEL_COMPILE=0 python3 benchmarks/gpu/check_cold_start.py

Prints the engine's start-up log (including ``aphrodite.kernels.precompile``'s line: kernel variants
compiled ahead in parallel, and any that failed), the seconds to ready, and a hash of 32 greedy tokens
for 4 prompts, which must be the same with and without compiling ahead (the same kernels run).
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--shape", default="llama-3.1-8b")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    logging.getLogger("aphrodite.kernels.precompile").setLevel(logging.DEBUG)
    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.model_shapes import write_model_shape

    with tempfile.TemporaryDirectory() as d:
        path = write_model_shape(args.shape, d)
        t0 = time.perf_counter()
        llm = LLM(str(path), load_format="dummy", skip_tokenizer_init=True,
                  tensor_parallel_size=args.tensor_parallel_size)
        ready = time.perf_counter() - t0
        prompts = [{"prompt_token_ids": [(i * 7919 + j * 31) % 30000 + 100 for j in range(64 + 32 * i)]}
                   for i in range(4)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        digest = hashlib.sha256(str([o.outputs[0].token_ids for o in outs]).encode()).hexdigest()[:16]
        llm.llm_engine.shutdown()
    print(f"COLD START tp={args.tensor_parallel_size} parallel_compile="
          f"{os.environ.get('APHRODITE_PARALLEL_COMPILE', '1')} ready {ready:.1f} s, greedy digest {digest}")


if __name__ == "__main__":
    main()
