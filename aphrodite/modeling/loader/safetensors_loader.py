"""Stream the tensors of a Hugging Face safetensors checkpoint (single file or sharded)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


def find_safetensors_files(directory: str) -> list[str]:
    """The checkpoint's .safetensors files, sorted.

    A sharded checkpoint's index names its shards; without an index every .safetensors file
    counts, except Mistral's ``consolidated*.safetensors`` duplicate when HF-named files exist.
    """
    if not os.path.isdir(directory):
        raise ValueError(f"safetensors loading needs a model directory, got {directory}")
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise ValueError(f"safetensors shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
    else:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        hf_named = [n for n in names if not n.startswith("consolidated")]
        names = hf_named or names
    if not names:
        raise ValueError(f"No .safetensors files in {directory}")
    return [os.path.join(directory, n) for n in names]


def iterate_safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, cpu tensor)`` one tensor at a time, memory-mapped, so peak memory stays small."""
    for path in find_safetensors_files(directory):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
