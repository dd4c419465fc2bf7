"""GGUF (llama.cpp) weights kept in their quantized blocks: ``--quantization gguf``.

A .gguf file gets this method by default (``quantization="none"`` dequantizes at load instead).
Each linear layer, the embedding and the LM head hold their weight as ``qweight``: uint8 rows of
llama.cpp blocks, plus ``qweight_type`` (the ggml type code per fused projection). The GGUF
loader streams ``<name>.qweight_type`` then ``<name>.qweight`` for every 2-D tensor; float
tensors of a GGUF file (F32/F16/BF16) travel the same way and are kept as plain values.

The type of a tensor is known only when it arrives, and fused layers may mix types (Q4_K_M
files store ``attn_v`` in Q6_K beside Q4_K ``attn_q``/``attn_k``), so each projection is
staged in a buffer of its own type's row width, sharded there by the layer's own loader
(output rows for column-parallel layers; whole blocks of the input for row-parallel ones:
each rank's input share must be a whole number of blocks), and when every projection has
arrived the layer's rows are packed into one flat ``qweight`` of *segments*: runs of
consecutive output rows of one type. A matmul runs one kernel per segment, writing its
columns of the output in place (one segment for uniform layers).

Kernels: on the CPU the C GEMV reads the blocks (decode); larger batches run the blocked 8-bit
GEMM on the blocks (bfloat16 activations, Q4_0/Q4_1/Q8_0, AVX-512 VNNI) or dequantize the weight
and use BLAS; on CUDA (or under ``TRITON_INTERPRET=1``) the
Triton kernels of ``aphrodite.kernels.gguf_matmul``; elsewhere the PyTorch reference.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.kernels import gguf_matmul
from aphrodite.kernels.cpu import gguf_ops
from aphrodite.kernels.gguf_matmul import GGML_BLOCKS, GGML_FLOAT_TYPES, row_bytes
from aphrodite.kernels.triton_utils import use_triton
from aphrodite.modeling.layers.quantization import register_quantization
from aphrodite.modeling.layers.quantization.base import LinearMethod, QuantizationConfig, frozen_parameter

WeightLoader = Callable[..., None]

# Up to this many rows the CPU reads the blocks (C GEMV, 8 rows per pass over the weight); more
# rows dequantize the weight (AVX-512, in cache-sized row tiles for the LM head) and run a BLAS GEMM.
# Measured on the CI machine (SmolLM2-135M Q4_1, all matmuls of a step, one thread, CPU time):
# float32 8 rows GEMV 47 ms vs dequantize+GEMM 67 ms, 16 rows 94 vs 109, 32 rows 178 vs 132;
# bfloat16 8 rows 55 vs 64, 16 rows 105 vs 76, 32 rows 242 vs 88.
CPU_GEMV_MAX_ROWS = 16
CPU_GEMV_MAX_ROWS_BF16 = 8


def cpu_gemv_max_rows(dtype: torch.dtype) -> int:
    """The most rows of ``dtype`` activations that take the C GEMV on the CPU."""
    return CPU_GEMV_MAX_ROWS_BF16 if dtype == torch.bfloat16 else CPU_GEMV_MAX_ROWS
# Above that, a weight of more than this many values (the LM head) is dequantized and multiplied in
# row tiles of about this size (4 MB in bf16), which stay in L3 between the two passes.
CPU_DEQUANT_TILE = 1 << 21
# 8-bit activations: rounded to 8 bits per 32 values as llama.cpp does (integer dot products, ~0.5%
# error per product). APHRODITE_GGUF_Q8_ACTIVATIONS: "1" everywhere; "0" nowhere (float32 products,
# results as dequantize-then-matmul); unset ("auto"): bfloat16 activations above the GEMV's rows
# (prefill, decode at batch 9+), where the blocked VNNI GEMM (gguf_gemm.c, Q4_0/Q4_1/Q8_0) is ~1.35x
# the dense bf16 GEMM, whose ~90% of the bf16 peak a dequantize + BLAS path can at best tie. float32
# stays exact by default (greedy output equal to transformers on the same file).
_Q8_SETTING = os.environ.get("APHRODITE_GGUF_Q8_ACTIVATIONS", "auto").lower()
CPU_Q8_ACTIVATIONS = _Q8_SETTING in ("1", "true", "yes", "on")
CPU_Q8_BATCH_BF16 = CPU_Q8_ACTIVATIONS or _Q8_SETTING == "auto"
_FLOAT_CODES = {dtype: code for code, dtype in GGML_FLOAT_TYPES.items()}
_ALIGN = 64   # segment starts in the flat buffer (float views need aligned storage)


@dataclass
class Segment:
    """Output rows ``[row0, row0 + rows)`` of a layer, all of one ggml type."""
    row0: int
    rows: int
    qtype: int              # a GGML_BLOCKS code, or a float code for plain values
    data: torch.Tensor      # [rows, row_bytes] uint8 view of ``qweight``, or [rows, K] floats
    cpu_call: gguf_ops.LinearCall | None = None   # the C GEMV bound to ``data``, made on first use
    cpu_gemm: gguf_ops.LinearCall | None = None   # the 8-bit-activation C call (GEMM for many rows), first use


@dataclass
class _Staging:
    """A layer's projections as they arrive, before they are packed into segments."""
    sizes: list[int]                     # output rows of each projection on this rank
    in_features: int                     # K on this rank
    layer_loader: WeightLoader
    params_dtype: torch.dtype
    types: list[int | None] = field(default_factory=list)
    loaded: set[int] = field(default_factory=set)
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)


def _shard_indices(shard_id: object, n: int) -> list[int]:
    if shard_id is None:
        return list(range(n))
    if isinstance(shard_id, str):
        return ["qkv".index(shard_id)]
    return [int(shard_id)]


def dummy_type(prefix: str, shard: int, k: int) -> int:
    """The block type a Q4_K_M file gives a weight (dummy weights for benchmarks): Q6_K for the LM
    head and, in every other layer, for ``v_proj`` and ``down_proj`` (llama.cpp picks about half the
    layers), Q4_K elsewhere; rows of ``k`` values that are not whole K-quant blocks get Q8_0 / Q4_0."""
    q4_k, q6_k = (12, 14) if k % 256 == 0 else (2, 8)
    if prefix.endswith("lm_head"):
        return q6_k
    parts = prefix.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), 1)
    more_bits = layer % 2 == 0
    if more_bits and (prefix.endswith("down_proj") or (prefix.endswith("qkv_proj") and shard == 2)
                      or prefix.endswith("v_proj")):
        return q6_k
    return q4_k


class GGUFLinearMethod(LinearMethod):
    """Linear layers (and the LM head) over GGUF blocks; ``dummy``: random Q4_K_M-like blocks
    instead of loaded ones (``load_format="dummy"``)."""

    def __init__(self, prefix: str = "", dummy: bool = False) -> None:
        self.prefix = prefix
        self.dummy = dummy

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        self._create(layer, list(output_partition_sizes), input_size_per_partition, params_dtype, weight_loader)

    def _create(self, layer: nn.Module, sizes: list[int], in_features: int, params_dtype: torch.dtype,
                weight_loader: WeightLoader) -> None:
        staging = _Staging(sizes, in_features, weight_loader, params_dtype, types=[None] * len(sizes))
        layer.gguf_staging = staging
        layer.gguf_segments = []
        layer.register_parameter("qweight", frozen_parameter((0,), torch.uint8, self._load_qweight(layer)))
        layer.register_parameter("qweight_type", frozen_parameter((len(sizes),), torch.int32,
                                                                  self._load_qweight_type(layer)))

    @staticmethod
    def _load_qweight_type(layer: nn.Module) -> WeightLoader:
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            staging: _Staging = layer.gguf_staging
            qtype = int(loaded.reshape(-1)[0])
            if qtype not in GGML_BLOCKS and qtype not in GGML_FLOAT_TYPES:
                row_bytes(qtype, staging.in_features)   # raises the ValueError naming what is supported
            for i in _shard_indices(shard_id, len(staging.sizes)):
                staging.types[i] = qtype
                param.data[i] = qtype
        return load

    @staticmethod
    def _load_qweight(layer: nn.Module) -> WeightLoader:
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            staging: _Staging = layer.gguf_staging
            indices = _shard_indices(shard_id, len(staging.sizes))
            qtype = staging.types[indices[0]]
            if qtype is None:
                raise ValueError("a GGUF qweight arrived before its qweight_type")
            buf = staging.buffers.get(qtype)
            if buf is None:
                rows = sum(staging.sizes)
                if qtype in GGML_FLOAT_TYPES:
                    buf = torch.zeros(rows, staging.in_features, dtype=staging.params_dtype, device=param.device)
                else:
                    buf = torch.zeros(rows, row_bytes(qtype, staging.in_features), dtype=torch.uint8,
                                      device=param.device)
                buf.output_dim, buf.input_dim = 0, 1   # what the layer's loader shards by
                staging.buffers[qtype] = buf
            staging.layer_loader(buf, loaded, shard_id)
            staging.loaded.update(indices)
            if len(staging.loaded) == len(staging.sizes):
                _pack_segments(layer, param)
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        staging = getattr(layer, "gguf_staging", None)
        if staging is not None and self.dummy:
            param = layer.qweight
            row0 = 0
            for i, size in enumerate(staging.sizes):
                if i not in staging.loaded:
                    qtype = dummy_type(self.prefix, i, staging.in_features)
                    staging.types[i] = qtype
                    if qtype not in staging.buffers:
                        staging.buffers[qtype] = torch.zeros(sum(staging.sizes), row_bytes(qtype, staging.in_features),
                                                             dtype=torch.uint8, device=param.device)
                    staging.buffers[qtype][row0:row0 + size] = gguf_matmul.random_blocks(
                        qtype, size, staging.in_features, scale=2e-5, device=param.device)
                    staging.loaded.add(i)
                row0 += size
            _pack_segments(layer, param)
            return
        if staging is not None:
            missing = [i for i in range(len(staging.sizes)) if i not in staging.loaded]
            raise ValueError(f"GGUF layer {getattr(layer, 'prefix', '')!r} lacks projections {missing}")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        segments: list[Segment] = layer.gguf_segments
        x2 = x.reshape(-1, x.shape[-1])
        gemv = _cpu_gemv(x2)   # decided once per call, not per segment (decode runs ~120 of these a token)
        if len(segments) == 1:
            out = _matmul(segments[0], x2, bias, gemv=gemv)
        else:
            n = segments[-1].row0 + segments[-1].rows
            out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
            # batch 1 on the GPU: the activations rounded once for all segments
            xq = None if gemv else gguf_matmul.q8_activations(x2)
            for seg in segments:
                part = None if bias is None else bias[seg.row0:seg.row0 + seg.rows]
                _matmul(seg, x2, part, out[:, seg.row0:seg.row0 + seg.rows], gemv=gemv, xq=xq)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


class GGUFEmbeddingMethod(GGUFLinearMethod):
    """The token embedding (rows dequantized on lookup) and, tied or not, the LM head's matmul."""

    def create_embedding_weights(self, layer: nn.Module, rows_per_rank: int, embedding_dim: int,
                                 params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        self._create(layer, [rows_per_rank], embedding_dim, params_dtype, weight_loader)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        seg: Segment = layer.gguf_segments[0]
        dtype = layer.gguf_dtype
        if seg.qtype in GGML_FLOAT_TYPES:
            return F.embedding(ids, seg.data)
        flat = ids.reshape(-1)
        if ids.device.type == "cpu" and gguf_ops.available(dtype):
            rows = gguf_ops.dequantize(seg.data, seg.qtype, layer.embedding_dim, dtype, rows=flat)
        else:
            rows = gguf_matmul.dequantize(seg.data[flat], seg.qtype, layer.embedding_dim, dtype)
        return rows.view(*ids.shape, layer.embedding_dim)


def _pack_segments(layer: nn.Module, param: nn.Parameter) -> None:
    """Move the staged projections into one flat ``qweight`` and describe its segments."""
    staging: _Staging = layer.gguf_staging
    runs: list[tuple[int, int, int]] = []   # (row0, rows, qtype)
    row0 = 0
    for size, qtype in zip(staging.sizes, staging.types, strict=True):
        if runs and runs[-1][2] == qtype:
            runs[-1] = (runs[-1][0], runs[-1][1] + size, qtype)
        else:
            runs.append((row0, size, qtype))
        row0 += size
    pieces, offsets, total = [], [], 0
    for r0, rows, qtype in runs:
        piece = staging.buffers[qtype][r0:r0 + rows].contiguous().view(torch.uint8).reshape(-1)
        offsets.append(total)
        pieces.append(piece)
        total += -(-piece.numel() // _ALIGN) * _ALIGN
    flat = torch.zeros(total, dtype=torch.uint8, device=param.device)
    for off, piece in zip(offsets, pieces, strict=True):
        flat[off:off + piece.numel()] = piece
    param.data = flat
    segments = []
    for off, piece, (r0, rows, qtype) in zip(offsets, pieces, runs, strict=True):
        view = flat[off:off + piece.numel()]
        if qtype in GGML_FLOAT_TYPES:
            segments.append(Segment(r0, rows, _FLOAT_CODES[staging.params_dtype],
                                    view.view(staging.params_dtype).view(rows, staging.in_features)))
        else:
            segments.append(Segment(r0, rows, qtype, view.view(rows, -1)))
    layer.gguf_segments = segments
    layer.gguf_dtype = staging.params_dtype
    del layer.gguf_staging


_SCRATCH: dict[torch.dtype, torch.Tensor] = {}


def _scratch(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused ``[rows, k]`` buffer for a weight dequantized for one CPU GEMM (batches above
    ``CPU_GEMV_MAX_ROWS``): a fresh tensor per call is a fresh mapping above glibc's mmap threshold
    (the 49,152 x 576 LM head), page-faulted in again on every step. It is consumed by the GEMM
    before the next call; the engine runs one forward at a time per process."""
    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < rows * k:
        buf = _SCRATCH[dtype] = torch.empty(rows * k, dtype=dtype)
    return buf[:rows * k].view(rows, k)


def _cpu_gemv(x: torch.Tensor) -> bool:
    """Whether ``x [M, K]`` goes through the C GEMV that reads the blocks (few rows on the CPU)."""
    return (x.device.type == "cpu" and x.shape[0] <= cpu_gemv_max_rows(x.dtype) and not use_triton(x)
            and gguf_ops.available(x.dtype))


def cpu_batch_q8(dtype: torch.dtype) -> bool:
    """Whether CPU batches above the GEMV's rows round ``dtype`` activations to 8 bits (the VNNI GEMM)."""
    return CPU_Q8_ACTIVATIONS or (CPU_Q8_BATCH_BF16 and dtype == torch.bfloat16)


def _cpu_gemm(seg: Segment, x: torch.Tensor) -> bool | None:
    """For many rows ``x [M, K]`` (above the GEMV's): False when they take the blocked 8-bit-activation C
    GEMM, True when the blocked float32 one (exact: float32 activations, one rounding per product as
    dequantize-then-matmul; ties oneDNN's packed float32 GEMM at 64 rows, where dequantize + BLAS is
    ~20% slower), None when neither (dequantize + BLAS)."""
    if not (seg.qtype in gguf_ops.GEMM_TYPES and x.shape[-1] % 32 == 0 and x.device.type == "cpu"
            and not use_triton(x) and gguf_ops.available(x.dtype) and gguf_ops.gemm_available()):
        return None
    if cpu_batch_q8(x.dtype):
        return False
    return True if x.dtype == torch.float32 else None


def _matmul(seg: Segment, x: torch.Tensor, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None, gemv: bool | None = None,
            xq: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """``x @ seg^T (+ bias)``, into ``out`` when given (a column slice of the layer's output).
    ``gemv``: the caller's ``_cpu_gemv(x)``, when it has it; ``xq``: the GPU's 8-bit activations of
    ``x`` (``gguf_matmul.q8_activations``), when the caller has them."""
    if seg.qtype in GGML_FLOAT_TYPES:
        y = F.linear(x, seg.data, bias)
    elif gemv or (gemv is None and _cpu_gemv(x)):
        if bias is None and x.is_contiguous():
            if seg.cpu_call is None:
                seg.cpu_call = gguf_ops.LinearCall(seg.data, seg.qtype, exact=not CPU_Q8_ACTIVATIONS)
            return seg.cpu_call(x, out)
        return gguf_ops.linear(seg.data, seg.qtype, x, bias, out=out, exact=not CPU_Q8_ACTIVATIONS)
    elif (exact := _cpu_gemm(seg, x)) is not None:   # the C GEMMs: gguf_ops.linear routes many rows there
        if bias is None and x.is_contiguous():
            if exact and seg.cpu_call is None:
                seg.cpu_call = gguf_ops.LinearCall(seg.data, seg.qtype, exact=True)
            if not exact and seg.cpu_gemm is None:
                seg.cpu_gemm = gguf_ops.LinearCall(seg.data, seg.qtype, exact=False)
            return (seg.cpu_call if exact else seg.cpu_gemm)(x, out)
        return gguf_ops.linear(seg.data, seg.qtype, x, bias, out=out, exact=exact)
    elif x.device.type == "cpu" and not use_triton(x):
        k = x.shape[-1]
        if gguf_ops.available(x.dtype):
            step = max(1, CPU_DEQUANT_TILE // k)
            if seg.rows > step:   # the LM head: tiles that stay in cache between dequantize and GEMM
                y = torch.empty(x.shape[0], seg.rows, dtype=x.dtype) if out is None else out
                for r0 in range(0, seg.rows, step):
                    r1 = min(seg.rows, r0 + step)
                    w = gguf_ops.dequantize(seg.data[r0:r1], seg.qtype, k, x.dtype, out=_scratch(r1 - r0, k, x.dtype))
                    y[:, r0:r1] = F.linear(x, w, None if bias is None else bias[r0:r1])
                return y
            w = gguf_ops.dequantize(seg.data, seg.qtype, k, x.dtype, out=_scratch(seg.rows, k, x.dtype))
        else:
            w = gguf_matmul.dequantize_reference(seg.data, seg.qtype, k, x.dtype)
        y = F.linear(x, w, bias)
    elif use_triton(x):
        y = gguf_matmul.gguf_linear(x, seg.data, seg.qtype, out=out, xq=xq)
        if bias is not None:
            y += bias
        return y
    else:
        y = F.linear(x, gguf_matmul.dequantize_reference(seg.data, seg.qtype, x.shape[-1], x.dtype), bias)
    if out is None:
        return y
    out.copy_(y)
    return out


@register_quantization
class GGUFConfig(QuantizationConfig):
    """GGUF files: every linear layer, the embedding and the LM head keep their blocks."""

    name = "gguf"

    def __init__(self, dummy: bool = False) -> None:
        self.dummy = dummy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        return cls(dummy=bool(config.get("dummy", False)))

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        return GGUFLinearMethod(prefix, self.dummy)

    def get_embedding_method(self, layer: nn.Module, prefix: str) -> GGUFEmbeddingMethod | None:
        return GGUFEmbeddingMethod(prefix, self.dummy)

    def supported_act_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.bfloat16, torch.float16, torch.float32)
