"""CPU decode steps of a GGUF Llama-shaped model in one C call (``aph_gguf_decode_stack``).

At batch 1 the default model's 30 small layers spend ~100 us each in Python between the kernels
(module calls, views, wrapper checks, allocations), a third of a step. For a decode-only batch
this runs every decoder layer and the final norm in C with the kernels the modules call, in the
same order and roundings, so the result is the module path's bit for bit; anything the C stack
does not cover (other families' extras, LoRA, tensor or pipeline parallelism, mixed block types
in one projection, fp8 caches, prefill) takes the module path. Batches above the GEMV's rows run
here when every projection takes a blocked C GEMM there (Q4_0/Q4_1/Q8_0; 8-bit activations for
bfloat16 by default, float ones for float32): at batch 64 the module path's Python is ~10 ms of a
~120 ms bfloat16 step.
``APHRODITE_GGUF_FUSED_DECODE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from aphrodite.kernels.attention_metadata import AttentionMetadata
from aphrodite.kernels.cpu import gguf_ops
from aphrodite.kernels.cpu.build import load_library
from aphrodite.kernels.gguf_matmul import GGML_BLOCKS
from aphrodite.modeling.layers.quantization import gguf as gguf_method

ENABLED = os.environ.get("APHRODITE_GGUF_FUSED_DECODE", "1").lower() not in ("0", "false", "no", "off")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("w", ctypes.c_void_p * 4), ("row_bytes", ctypes.c_long * 4), ("type", ctypes.c_int * 4),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("cos_sin", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("window", ctypes.c_int)]


class _Plan:
    """The stack's C description for one activation dtype and one binding of the KV caches."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, lib: ctypes.CDLL) -> None:
        layers = list(model.layers)
        first = layers[0]
        attn = first.self_attn
        self.dtype = dtype
        self.hidden = first.input_layernorm.hidden_size
        self.hq, self.hkv, self.d = attn.attn.num_heads, attn.attn.num_kv_heads, attn.head_dim
        self.inter = first.mlp.down_proj.in_features
        self.caches = [ly.self_attn.attn.kv_cache for ly in layers]
        self.keep: list[torch.Tensor] = []    # tensors whose memory the C side reads
        arr = (_Layer * len(layers))()
        for i, ly in enumerate(layers):
            projs = (ly.self_attn.qkv_proj, ly.self_attn.o_proj, ly.mlp.gate_up_proj, ly.mlp.down_proj)
            k_cache, v_cache = self.caches[i]
            table = model.rotary_embs[model.rope_index[i]].cos_sin_cache
            norms = [self._param(n.weight, dtype) for n in (ly.input_layernorm, ly.post_attention_layernorm)]
            a = arr[i]
            a.input_norm, a.post_norm = norms[0].data_ptr(), norms[1].data_ptr()
            for j, proj in enumerate(projs):
                seg = proj.gguf_segments[0]
                a.w[j] = seg.data.data_ptr()
                a.row_bytes[j] = seg.data.shape[1]
                a.type[j] = seg.qtype
            a.k_cache, a.v_cache, a.cos_sin = k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr()
            a.eps = ly.input_layernorm.eps
            a.scale = ly.self_attn.attn.scale
            a.window = int(ly.self_attn.attn.sliding_window or 0)
            self.keep += [table, k_cache, v_cache]
        self.layers = arr
        # batches above the GEMV's rows: only where every projection takes a C GEMM in the module path
        self.gemm_ok = gguf_ops.gemm_available() and all(
            a.type[j] in gguf_ops.GEMM_TYPES for a in arr for j in range(4))
        self.final_norm = self._param(model.norm.weight, dtype)
        self.final_eps = ctypes.c_float(model.norm.eps)
        self.block_size = self.caches[0][0].shape[1]
        self.lib = lib
        self._fn = lib.aph_gguf_decode_stack
        self._work: torch.Tensor | None = None

    def _param(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.detach()
        t = t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()
        self.keep.append(t)
        return t

    def work(self, rows: int) -> torch.Tensor:
        n = self.lib.aph_gguf_stack_work_elems(rows, self.hidden, self.hq, self.hkv, self.d, self.inter)
        if self._work is None or self._work.numel() < n:
            self._work = torch.empty(n, dtype=self.dtype)
        return self._work

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            exact: bool = True) -> torch.Tensor:
        b = hidden.shape[0]
        tables = _as(meta.block_tables, torch.int32)
        lens = _as(meta.seq_lens, torch.int32)
        slots = _as(meta.slot_mapping, torch.int64)
        pos = _as(positions, torch.int64)
        out = hidden.contiguous()   # overwritten in place: the embedding rows of this step
        ok = self._fn(_DTYPE_CODES[self.dtype], len(self.layers), self.layers, b, self.hidden, self.hq, self.hkv,
                      self.d, self.inter, ctypes.c_void_p(pos.data_ptr()), ctypes.c_void_p(slots.data_ptr()),
                      ctypes.c_void_p(tables.data_ptr()), ctypes.c_void_p(lens.data_ptr()), self.block_size,
                      tables.shape[1], ctypes.c_void_p(self.final_norm.data_ptr()), self.final_eps,
                      ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(self.work(b).data_ptr()),
                      int(exact))
        if not ok:
            raise RuntimeError("the fused GGUF decode stack refused a projection it was planned for")
        return out


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _is_gguf_blocks(proj: nn.Module, cls: type) -> bool:
    segs = getattr(proj, "gguf_segments", None)
    return (type(proj) is cls and isinstance(proj.quant_method, gguf_method.GGUFLinearMethod)
            and proj.bias is None and proj.tp_size == 1 and segs is not None and len(segs) == 1
            and segs[0].qtype in GGML_BLOCKS and segs[0].data.is_contiguous())


def eligible(model: nn.Module) -> bool:
    """Whether every layer of ``model`` (a ``DecoderModel``) is one the C stack runs exactly."""
    from aphrodite.modeling.layers.activation import SiluAndMul
    from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from aphrodite.modeling.layers.mlp import GatedMLP
    from aphrodite.modeling.layers.norm import RMSNorm
    from aphrodite.modeling.models.decoder import DecoderLayer
    layers = list(getattr(model, "layers", []))
    if (not layers or model.start_layer != 0 or model.end_layer != len(layers) or model.embed_scale is not None
            or type(getattr(model, "norm", None)) is not RMSNorm):
        return False
    for ly in layers:
        attn = getattr(ly, "self_attn", None)
        mlp = getattr(ly, "mlp", None)
        if (type(ly) is not DecoderLayer or ly.sandwich or ly.mlp_name != "mlp" or type(mlp) is not GatedMLP
                or type(mlp.act_fn) is not SiluAndMul or attn.q_norm is not None
                or type(ly.input_layernorm) is not RMSNorm or type(ly.post_attention_layernorm) is not RMSNorm
                or attn.attn.logits_soft_cap or attn.head_dim > 256 or attn.head_dim % 2):
            return False
        if not (_is_gguf_blocks(attn.qkv_proj, QKVParallelLinear) and _is_gguf_blocks(attn.o_proj, RowParallelLinear)
                and _is_gguf_blocks(mlp.gate_up_proj, MergedColumnParallelLinear)
                and _is_gguf_blocks(mlp.down_proj, RowParallelLinear)):
            return False
    return True


def fused_decode(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor | None:
    """The final normed hidden states of a decode-only step of ``model`` (a ``DecoderModel``) from its
    embeddings ``hidden [B, H]``, or None where the module path must run it."""
    if not ENABLED or hidden.device.type != "cpu" or hidden.dtype not in _DTYPE_CODES:
        return None
    b = hidden.shape[0]
    many = b > gguf_method.cpu_gemv_max_rows(hidden.dtype)
    q8_many = gguf_method.cpu_batch_q8(hidden.dtype)   # else float32 rows take the float GEMM, bf16 ones BLAS
    if not (meta.num_decodes == meta.num_seqs == b) or (many and not q8_many and hidden.dtype != torch.float32):
        return None
    state = model.__dict__.get("_gguf_decode_plan")
    if state is False:
        return None
    if state is None:
        lib = load_library()
        if lib is None or not gguf_ops.available(hidden.dtype) or not eligible(model):
            model.__dict__["_gguf_decode_plan"] = False
            return None
        state = model.__dict__["_gguf_decode_plan"] = {}
    plan = state.get(hidden.dtype)
    caches = [ly.self_attn.attn.kv_cache for ly in model.layers]
    if plan is None or any(c is not p for c, p in zip(caches, plan.caches, strict=True)):
        if any(c is None or c[0].dtype != hidden.dtype or not c[0].is_contiguous() or not c[1].is_contiguous()
               for c in caches):
            return None
        if any(r.cos_sin_cache.dtype != hidden.dtype for r in model.rotary_embs):
            return None
        plan = state[hidden.dtype] = _Plan(model, hidden.dtype, load_library())
    if many and not plan.gemm_ok:
        return None
    return plan.run(hidden, positions, meta, exact=not (q8_many if many else gguf_method.CPU_Q8_ACTIVATIONS))
