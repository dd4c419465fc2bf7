"""Stream the tensors of a Hugging Face safetensors checkpoint (single file or sharded).

Tensors come out lazy (``LazyTensor`` over ``safe_open(...).get_slice``): a tensor-parallel
rank's weight loaders ``narrow`` them to its shard, and only that block is read from the file,
so no rank ever holds a whole sharded weight; other pipeline stages' tensors are not read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open

from aphrodite.modeling.loader.lazy_tensor import LazyTensor

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


# safetensors' dtype names -> torch dtypes.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def iterate_safetensors_weights(directory: str) -> Iterator[tuple[str, LazyTensor]]:
    """Yield ``(name, LazyTensor)`` per checkpoint tensor; each reads only the block asked of it.

    The files stay open (memory-mapped) while any of their lazy tensors is alive.
    """
    for path in find_safetensors_files(directory):
        f = safe_open(path, framework="pt", device="cpu")
        for name in f.keys():
            part = f.get_slice(name)
            dtype = _DTYPES.get(part.get_dtype())
            if dtype is None:
                raise ValueError(f"tensor {name} in {path} has dtype {part.get_dtype()}, which is not supported")
            yield name, LazyTensor(_slice_reader(part), part.get_shape(), dtype)


def _slice_reader(part: object) -> Callable[[tuple[slice, ...]], torch.Tensor]:
    def read(slices: tuple[slice, ...]) -> torch.Tensor:
        # safetensors returns a view of the memory map: copy the block out (and only it).
        return part[slices].clone()  # type: ignore[index]
    return read
