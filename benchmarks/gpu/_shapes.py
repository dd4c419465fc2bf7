"""Helpers shared by the family/MoE GPU benchmarks: parameter counts of a model shape and a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

H200_HBM_BYTES_PER_S = 4.8e12      # H200 SXM HBM3e
H200_BF16_FLOPS = 989e12           # dense bf16 tensor-core peak


def active_params(shape: str) -> dict[str, float]:
    """Parameters of ``shape`` (built on the meta device with our model code): total, the ones one
    decoded token reads: everything but the embedding table (the LM head is read whole, the embedding one
    row), with routed experts counted at ``top_k / num_experts``; and ``lm_head``, which a prompt token
    whose logits nobody samples never multiplies (see ``prefill_active``)."""
    from transformers import AutoConfig

    from aphrodite.benchmarks.model_shapes import write_model_shape
    from aphrodite.modeling.models.registry import get_model_class
    with tempfile.TemporaryDirectory() as tmp:
        config = AutoConfig.from_pretrained(write_model_shape(shape, tmp))
    with torch.device("meta"):
        model = get_model_class(config.architectures[0])(config)
    total = active = 0.0
    head = float(config.vocab_size * config.hidden_size)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = float(p.numel())
        total += n
        if name.endswith(("w13_weight", "w2_weight")):
            active += n * config.num_experts_per_tok / (getattr(config, "num_experts", None)
                                                         or config.num_local_experts)
        elif name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            continue
        else:
            active += n
    return {"total": total, "active": active, "lm_head": head}


def prefill_active(params: dict[str, float], input_len: int, output_len: int) -> float:
    """Parameters multiplied per token of an ``input_len``/``output_len`` workload: a prompt token's
    forward skips the LM head (only the last position of a prompt is sampled), so the head counts at
    the share of tokens that are sampled. Comparing prefill per ``active`` parameter instead would
    charge a 128k-vocabulary Llama for a head its prompt tokens never touch."""
    sampled = output_len / (input_len + output_len)
    return params["active"] - params["lm_head"] * (1.0 - sampled)


def bench(kind: str, shape: str, *args: str, timeout: int = 400) -> dict[str, Any]:
    """``aphrodite bench <kind> --model-shape <shape> ...`` in a fresh process (its GPU memory freed after);
    its JSON results, or ``{"error": ...}``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "aphrodite.endpoints.cli", "bench", kind, "--model-shape", shape,
           "--output-json", out, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    print("$", " ".join(cmd[1:]), flush=True)
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "INFO" not in ln and "it/s" not in ln]
    print("\n".join(lines[-12:]), flush=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(Path(out).read_text())
