"""Check that a Triton kernel variant compiled after start-up is reported (``precompile.warn_late_compiles``).

    python3 benchmarks/gpu/check_late_compile.py      # one GPU, ~20 s (SmolLM2-135M's shape, dummy weights)

Starts an engine, then launches an RMSNorm over a hidden size and dtype no model of the run has (a new Triton
specialization, compiled now with an empty cache directory) twice: the first launch must log the warning
once, the second (now in memory) must not.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-late-")   # nothing cached before this run
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch

    from aphrodite import LLM
    from aphrodite.benchmarks.model_shapes import write_model_shape
    from aphrodite.kernels.rmsnorm import rms_norm

    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "compiles at first use" in record.getMessage() or "compiled ahead" in record.getMessage():
                records.append(record.getMessage())
    logging.getLogger("aphrodite.kernels.precompile").addHandler(Catch())
    with tempfile.TemporaryDirectory() as d:
        llm = LLM(str(write_model_shape("smollm2-135m", d)), load_format="dummy", skip_tokenizer_init=True)
        assert llm.llm_engine.config.model.hf_config.hidden_size != 1000
        from triton import knobs
        print(f"jit_cache_hook after start-up: {knobs.runtime.jit_cache_hook!r}", flush=True)
        before = len(records)
        y = torch.randn(3, 1000, device="cuda", dtype=torch.float32)
        rms_norm(y, torch.ones(1000, device="cuda", dtype=torch.float32), 1e-5)
        first = len(records) - before
        rms_norm(y, torch.ones(1000, device="cuda", dtype=torch.float32), 1e-5)
        torch.cuda.synchronize()
    ok = before == 0 and first == 1 and len(records) == 1 and "_rms_norm_kernel" in records[0]
    print("\n".join(records))
    print(f"RESULT late-compile warning: {'PASS' if ok else 'FAIL'} (during start-up and the engine's own runs: "
          f"{before}; first launch of a new variant: {first}; second launch: {len(records) - before - first})")


if __name__ == "__main__":
    main()
