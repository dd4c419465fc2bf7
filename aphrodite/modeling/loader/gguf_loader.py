"""Stream the weights of a GGUF file as Hugging Face checkpoint tensors.

The model code speaks only HF parameter names, so a GGUF file is turned into
``(hf_name, float32 LazyTensor)`` pairs here, once: tensors are dequantized with the
``gguf`` package one at a time (the file stays memory-mapped), renamed, and the
row permutation llama.cpp applies to Q/K projections is undone, exactly as
transformers does, so both loaders see the same numbers.
"""
from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aphrodite.modeling.loader.lazy_tensor import LazyTensor

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "gguf_architecture", "iterate_gguf_weights",
           "read_gguf_metadata"]


@dataclass(frozen=True)
class _ArchSpec:
    """How one GGUF architecture's tensors become HF names."""
    block_names: dict[str, str]     # GGUF "blk.N.<key>" -> HF "model.layers.N.<value>"
    global_names: dict[str, str]    # GGUF "<key>" -> HF "<value>"
    permute_qk: bool                # llama.cpp interleaves Q/K rows for its rotary layout
    ignored: frozenset[str] = frozenset()  # GGUF tensors HF derives from the config instead
    norm_offset: float = 0.0        # added to every norm weight (Gemma files store 1 + w)


_LLAMA = _ArchSpec(
    block_names={
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    },
    global_names={
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    },
    permute_qk=True,
    # Llama 3.1 files carry precomputed rope frequency factors; HF computes them from rope_scaling.
    ignored=frozenset({"rope_freqs.weight"}),
)

# Family maps on top of Llama's (tensor names as llama.cpp's gguf-py writes them).
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Routed experts come stacked ([E, ...] per projection); the MoE loader splits them per expert.
_EXPERTS = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
            "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}
_SHARED_EXPERT = {"ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                  "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj"}
_GEMMA_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def _family(block_extra: dict[str, str], permute_qk: bool = False, drop: tuple[str, ...] = (),
            ignored: frozenset[str] = frozenset(), norm_offset: float = 0.0) -> _ArchSpec:
    blocks = {k: v for k, v in _LLAMA.block_names.items() if k not in drop}
    return _ArchSpec({**blocks, **block_extra}, dict(_LLAMA.global_names), permute_qk, ignored, norm_offset)


# general.architecture -> spec. Mistral (and Mixtral) files are written as "llama" by llama.cpp.
_ARCHITECTURES: dict[str, _ArchSpec] = {
    "llama": _family({**_EXPERTS, "ffn_gate_inp": "block_sparse_moe.gate",
                      "ffn_gate_exps": "block_sparse_moe.experts.gate_proj",
                      "ffn_up_exps": "block_sparse_moe.experts.up_proj",
                      "ffn_down_exps": "block_sparse_moe.experts.down_proj"}, True, ignored=_LLAMA.ignored),
    "qwen2": _family({}),
    "qwen3": _family(_QK_NORM),
    "qwen2moe": _family({**_EXPERTS, **_SHARED_EXPERT}),
    "qwen3moe": _family({**_QK_NORM, **_EXPERTS}),
    # Phi-3 files keep the fused projections: attn_qkv, and ffn_up holding gate and up.
    "phi3": _family({"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                    drop=("attn_q", "attn_k", "attn_v", "ffn_gate"),
                    ignored=frozenset({"rope_factors_long.weight", "rope_factors_short.weight"})),
    "gemma2": _family(_GEMMA_NORMS, norm_offset=-1.0),
    "gemma3": _family({**_GEMMA_NORMS, **_QK_NORM}, norm_offset=-1.0),
}
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


# ---------------------------------------------------------------------------------------------
# File layout: a small header parser over a memory map. GGUFReader parses every metadata field
# into numpy views (the whole tokenizer vocabulary too), which takes seconds for a 135M model;
# the weights need only the tensor table, and most callers one string.

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of a scalar of that type.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]   # ggml order: dims[0] is the contiguous one
    ggml_type: int
    offset: int             # from the start of the data section


class _Header:
    """Cursor over the mapped bytes of a GGUF header (little-endian files only)."""

    def __init__(self, buf: Any, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path
        if bytes(buf[:4]) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        self.pos = 4
        version = self.scalar("I")
        if version & 0xFFFF == 0:
            raise ValueError(f"{path} is a big-endian GGUF file, which is not supported")
        if version < 2:
            raise ValueError(f"GGUF version {version} of {path} is not supported (need 2 or later)")
        self.tensor_count = self.scalar("Q")
        self.kv_count = self.scalar("Q")

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"truncated GGUF header in {self.path}") from None
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        value = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, vtype: int, keep: bool) -> Any:
        """Read (keep=True) or skip (keep=False) one metadata value of type ``vtype``."""
        if vtype == _STRING:
            if keep:
                return self.string()
            n = self.scalar("Q")  # read before moving: ``pos += scalar()`` would lose the advance
            self.pos += n
            return None
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if not keep and etype in _SCALAR_FORMATS:
                self.pos = self.pos + struct.calcsize("<" + _SCALAR_FORMATS[etype]) * count
                return None
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else None
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {vtype} in {self.path}")
        return self.scalar(_SCALAR_FORMATS[vtype])

    def metadata(self, keys: Any, stop_early: bool) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for _ in range(self.kv_count):
            key = self.string()
            vtype = self.scalar("I")
            wanted = key in keys
            value = self.value(vtype, keep=wanted)
            if wanted:
                found[key] = value
                if stop_early and len(found) == len(keys):
                    break
        return found

    def tensor_infos(self) -> list[_TensorInfo]:
        infos = []
        for _ in range(self.tensor_count):
            name = self.string()
            n_dims = self.scalar("I")
            dims = tuple(self.scalar("Q") for _ in range(n_dims))
            infos.append(_TensorInfo(name, dims, self.scalar("I"), self.scalar("Q")))
        return infos


def read_gguf_metadata(path: str, keys: set[str] | frozenset[str]) -> dict[str, Any]:
    """The metadata values of ``keys`` present in the GGUF at ``path`` (absent keys are left out).

    Stops as soon as all keys are found, and skips large arrays without decoding them.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _Header(buf, path).metadata(keys, stop_early=True)


def gguf_architecture(path: str) -> str:
    """``general.architecture`` of a GGUF file (e.g. ``"llama"``), read from the header alone."""
    arch = read_gguf_metadata(path, {"general.architecture"}).get("general.architecture")
    if not arch:
        raise ValueError(f"GGUF file {path} has no general.architecture")
    return arch


def _read_layout(path: str) -> tuple[str, list[_TensorInfo], int]:
    """(architecture, tensor table, byte offset of the data section) of a GGUF file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = _Header(buf, path)
        meta = header.metadata({"general.architecture", "general.alignment"}, stop_early=False)
        infos = header.tensor_infos()
        alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"GGUF file {path} has an invalid alignment {alignment}")
        data_offset = -(-header.pos // alignment) * alignment
    arch = meta.get("general.architecture")
    if not arch:
        raise ValueError(f"GGUF file {path} has no general.architecture")
    return arch, infos, data_offset


def _tensor_data(file: np.ndarray, info: _TensorInfo, data_offset: int) -> tuple[np.ndarray, Any]:
    """The raw array of one tensor, shaped the way ``gguf.quants.dequantize`` expects, and its type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(info.ggml_type)
    shape = tuple(reversed(info.dims))
    n_elems = int(np.prod(info.dims))
    start = data_offset + info.offset
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
        return file[start:start + n_elems * np.dtype(dtype).itemsize].view(dtype).reshape(shape), qtype
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        raise ValueError(f"GGUF tensor {info.name}: row of {shape[-1]} is not a multiple of the "
                         f"{qtype.name} block size {block_size}")
    byte_shape = (*shape[:-1], shape[-1] // block_size * type_size)
    n_bytes = n_elems // block_size * type_size
    return file[start:start + n_bytes].reshape(byte_shape), qtype


def _arch_spec(arch: str, path: str) -> _ArchSpec:
    spec = _ARCHITECTURES.get(arch)
    if spec is None:
        raise ValueError(f"GGUF architecture {arch!r} of {path} is not supported; supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return spec


# ---------------------------------------------------------------------------------------------
# Tensors

def _hf_name(spec: _ArchSpec, gguf_name: str) -> str | None:
    """HF name of a GGUF tensor, or None if it has no counterpart in the llama family map."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, key, suffix = m.groups()
        base = spec.block_names.get(key)
        return None if base is None else f"model.layers.{layer}.{base}.{suffix}"
    if m := _GLOBAL_RE.fullmatch(gguf_name):
        key, suffix = m.groups()
        base = spec.global_names.get(key)
        return None if base is None else f"{base}.{suffix}"
    return None


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permute: per head, rows were reordered from (2, half) to (half, 2).

    The convert script does ``w.reshape(n_head, 2, half, ...).swapaxes(1, 2)``; this is its
    inverse, the same reindexing transformers applies.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(hf_config: Any) -> tuple[int, int]:
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    return n_head, n_kv


def iterate_gguf_weights(path: str, hf_config: Any,
                         keep_quantized: bool = False) -> Iterator[tuple[str, LazyTensor | torch.Tensor]]:
    """Yield ``(hf_name, float32 LazyTensor)`` for every weight in the GGUF at ``path``.

    A tensor is dequantized when it is used, and of a matrix only the rows asked for (a
    tensor-parallel shard): other pipeline stages' tensors are never dequantized.

    ``lm_head.weight`` appears only when the file has an ``output`` tensor (otherwise the
    embeddings are tied). Raises ``ValueError`` for an unsupported architecture or an unknown
    tensor name, before anything is yielded.

    ``keep_quantized`` (``--quantization gguf``): every matrix ``<x>.weight`` is yielded as
    ``<x>.qweight_type`` (a 0-d int tensor, the ggml type) followed by ``<x>.qweight``: the raw
    ``uint8 [rows, row_bytes]`` blocks for the block types the kernels read, float32 values for
    float tensors and for block types they do not (those are dequantized here, type F32).
    """
    from aphrodite.kernels.gguf_matmul import GGML_BLOCKS

    arch, infos, data_offset = _read_layout(path)
    spec = _arch_spec(arch, path)
    n_head, n_kv = _heads(hf_config)
    n_layers = getattr(hf_config, "num_hidden_layers", None)

    plan: list[tuple[_TensorInfo, str]] = []
    unknown: list[str] = []
    for info in infos:
        if info.name in spec.ignored:
            continue
        name = _hf_name(spec, info.name)
        if name is None:
            unknown.append(info.name)
            continue
        if n_layers is not None and (m := _BLOCK_RE.fullmatch(info.name)) and int(m[1]) >= n_layers:
            raise ValueError(f"GGUF tensor {info.name} is beyond the config's {n_layers} layers")
        plan.append((info, name))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"GGUF file {path} has tensors this loader does not know: {shown}")

    # A plain ndarray view of the map: slicing a np.memmap pays per-slice subclass overhead.
    file = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    for info, name in plan:
        raw, qtype = _tensor_data(file, info, data_offset)
        perm = None
        if spec.permute_qk and ".attn_q." in info.name:
            perm = _unpermute_rows(np.arange(raw.shape[0]), n_head)
        elif spec.permute_qk and ".attn_k." in info.name:
            perm = _unpermute_rows(np.arange(raw.shape[0]), n_kv)
        if keep_quantized and len(info.dims) == 2 and name.endswith(".weight"):
            # Every matrix travels as <x>.qweight_type + <x>.qweight (see above).
            base = name[:-len(".weight")]
            if int(qtype) in GGML_BLOCKS:
                yield f"{base}.qweight_type", torch.tensor(int(qtype), dtype=torch.int32)
                yield f"{base}.qweight", LazyTensor(_raw_reader(raw, perm), raw.shape, torch.uint8)
                continue
            yield f"{base}.qweight_type", torch.tensor(0, dtype=torch.int32)   # F32 values follow
            name = f"{base}.qweight"
        read = _gguf_reader(raw, qtype, perm, info.name)
        if spec.norm_offset and name.endswith("norm.weight"):
            read = _offset(read, spec.norm_offset)
        yield name, LazyTensor(read, tuple(reversed(info.dims)), torch.float32)


def _offset(read: Callable[[tuple[slice, ...]], torch.Tensor],
            offset: float) -> Callable[[tuple[slice, ...]], torch.Tensor]:
    return lambda slices: read(slices) + offset


def _raw_reader(raw: np.ndarray, perm: np.ndarray | None) -> Callable[[tuple[slice, ...]], torch.Tensor]:
    """Read a block of a quantized matrix's raw bytes ``[rows, row_bytes]`` (rows through the Q/K
    permutation); sharding code asks for whole rows or whole blocks of bytes."""
    def read(slices: tuple[slice, ...]) -> torch.Tensor:
        data = raw[perm[slices[0]]] if perm is not None else raw[slices[0]]
        return torch.from_numpy(np.array(data[(slice(None), *slices[1:])], dtype=np.uint8, copy=True))
    return read


def _gguf_reader(raw: np.ndarray, qtype: Any, perm: np.ndarray | None,
                 gguf_name: str) -> Callable[[tuple[slice, ...]], torch.Tensor]:
    """Read a block of one GGUF tensor as float32: of a matrix, only the selected rows are
    dequantized (quantization blocks run along a row), then the columns are cut."""
    from gguf.quants import dequantize

    def read(slices: tuple[slice, ...]) -> torch.Tensor:
        data, rest = raw, slices
        if raw.ndim >= 2 and slices:
            # Rows of the HF tensor are rows of the file, through llama.cpp's Q/K permutation.
            data = raw[perm[slices[0]]] if perm is not None else raw[slices[0]]
            rest = (slice(None), *slices[1:])
        try:
            weights = dequantize(data, qtype)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {gguf_name} has type {qtype.name}, which the gguf package "
                             "cannot dequantize") from None
        # Copy out of the memory map, so no tensor keeps the file mapped.
        return torch.from_numpy(np.array(weights[rest], dtype=np.float32, copy=True))
    return read
