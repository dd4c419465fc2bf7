"""The decoder-only transformer every family is built from; a family file only fills in a ``DecoderSpec``.

``forward(input_ids [T], positions [T]) -> hidden [T, hidden_size]``: no batch dimension, no
padding; the per-sequence layout lives in the attention metadata of the step. The engine picks
the rows it wants and calls ``compute_logits``. Each decoder layer runs q/k/v and gate/up as
single fused matmuls and carries the residual stream through the norms (``norm(x, residual)``
returns the normed sum and the sum), to keep the per-layer op count low.

What differs between families, and where it is set:
* attention: q/k/v bias, per-head q/k norms (Qwen3, Gemma 3), the softmax scale (Gemma's
  ``query_pre_attn_scalar``), logit soft-capping (Gemma 2), the sliding window of each layer
  (``config.layer_types``, or ``config.sliding_window`` for all layers as in Mistral and Phi-3);
* RoPE: one table per distinct RoPE setting (Gemma 3's local and global layers differ);
* norms: ``RMSNorm`` or Gemma's ``(1 + w)`` form, pre-norm or Gemma's sandwich of four norms;
* the feed-forward block: ``GatedMLP`` (any activation) or a mixture of experts (``spec.mlp``);
* embeddings scaled by ``sqrt(hidden_size)`` (Gemma), final logit soft-capping (Gemma 2);
* checkpoint names: q/k/v and gate/up are fused here (``STACKED_PARAMS``); ``spec.renames`` and
  ``spec.experts`` map what else differs.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from aphrodite.config import layer_sliding_windows
from aphrodite.kernels.qk_norm import qk_rms_norm
from aphrodite.modeling.layers.attention import Attention, get_attention_metadata
from aphrodite.modeling.layers.embedding import ParallelLMHead, VocabParallelEmbedding, compute_lm_logits
from aphrodite.modeling.layers.linear import QKVParallelLinear, RowParallelLinear
from aphrodite.modeling.layers.mlp import GatedMLP
from aphrodite.modeling.layers.moe import expert_params_mapping
from aphrodite.modeling.layers.norm import GemmaRMSNorm, RMSNorm, norm_add_norm
from aphrodite.modeling.layers.quantization import QuantizationConfig
from aphrodite.modeling.layers.quantization.gguf_decode import fused_decode
from aphrodite.modeling.layers.rotary import RotaryEmbedding, get_rope_config
from aphrodite.modeling.models.pipeline import (
    IntermediateTensors,
    PPMissingLayer,
    is_pp_missing_parameter,
    make_layers,
    pp_module,
    stage_input,
    stage_output,
)

logger = logging.getLogger(__name__)

# (our fused parameter, checkpoint projection, shard id): the one place HF names map to ours.
STACKED_PARAMS = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

MlpFactory = Callable[[Any, int, "QuantizationConfig | None", str], nn.Module]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def dense_mlp(config: Any, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
    """The default feed-forward block: a gated MLP of ``config.intermediate_size``."""
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    return GatedMLP(config.hidden_size, config.intermediate_size, act, bool(getattr(config, "mlp_bias", False)),
                    quant_config, prefix)


@dataclass(frozen=True)
class DecoderSpec:
    """What a family changes in the shared decoder (defaults: Llama)."""

    norm: type[RMSNorm] = RMSNorm
    qkv_bias: bool | None = None           # None: config.attention_bias
    o_bias: bool | None = None             # None: config.attention_bias
    qk_norm: bool = False                  # per-head RMSNorm of q and k before RoPE
    sandwich_norms: bool = False           # Gemma: norms after attention and around the MLP too
    scale_embeddings: bool = False         # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: bool = False    # Gemma: softmax scale from config.query_pre_attn_scalar
    mlp: MlpFactory = dense_mlp
    mlp_name: str = "mlp"                  # the block's checkpoint name (Mixtral: block_sparse_moe)
    renames: tuple[tuple[str, str], ...] = ()            # checkpoint substring -> ours, applied first
    experts: tuple[str, str, str] | None = None          # per-expert (gate, up, down) checkpoint names


class DecoderAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, spec: DecoderSpec, window: int | None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.head_dim = d = head_dim(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias if spec.qkv_bias is None else spec.qkv_bias
        o_bias = bias if spec.o_bias is None else spec.o_bias
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, config.num_attention_heads, num_kv_heads,
                                          bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size, bias=o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.q_norm = self.k_norm = None
        if spec.qk_norm:
            self.q_norm = spec.norm(d, config.rms_norm_eps)
            self.k_norm = spec.norm(d, config.rms_norm_eps)
        scale = (config.query_pre_attn_scalar ** -0.5) if spec.query_pre_attn_scalar else d ** -0.5
        self.attn = Attention(self.qkv_proj.num_heads, d, scale, self.qkv_proj.num_kv_heads, sliding_window=window,
                              logits_soft_cap=getattr(config, "attn_logit_softcapping", None))

    def forward(self, hidden: torch.Tensor, rotary: RotaryEmbedding, rope: tuple) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        fused = rotary.fused_rope(rope)
        if self.q_norm is None:
            if fused is not None:   # the attention backend rotates q/k in the same pass as its cache write
                q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                return self.o_proj(self.attn(q, k, v, rope=fused))
            # Rotate q and k together (they are adjacent in the fused output), leave v as a view.
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            q, k = rotary.rotate_qk(qk, self.q_size, rope)
            return self.o_proj(self.attn(q, k, v))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t, d = hidden.shape[0], self.head_dim
        if qkv.is_cuda and isinstance(self.q_norm, RMSNorm):
            # One launch for both: normalising the strided q/k views one at a time copies each first.
            q, k = qk_rms_norm(qkv, self.q_norm.weight, self.k_norm.weight, self.q_size // d, self.kv_size // d, d,
                               self.q_norm.eps, gemma=isinstance(self.q_norm, GemmaRMSNorm))
        else:
            q = self.q_norm(q.reshape(t, -1, d)).view(t, -1)
            k = self.k_norm(k.reshape(t, -1, d)).view(t, -1)
        if fused is not None:
            return self.o_proj(self.attn(q, k, v, rope=fused))
        q, k = rotary.rotate_qk(torch.cat([q, k], dim=-1), self.q_size, rope)
        return self.o_proj(self.attn(q, k, v))


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, spec: DecoderSpec, window: int | None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.sandwich = spec.sandwich_norms
        self.self_attn = DecoderAttention(config, layer_idx, spec, window, quant_config, f"{prefix}.self_attn")
        self.mlp_name = spec.mlp_name
        setattr(self, spec.mlp_name, spec.mlp(config, layer_idx, quant_config, f"{prefix}.{spec.mlp_name}"))
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = spec.norm(size, eps)
        self.post_attention_layernorm = spec.norm(size, eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = spec.norm(size, eps)
            self.post_feedforward_layernorm = spec.norm(size, eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryEmbedding,
                rope: tuple, pending_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, residual)`` in, ``(hidden, residual)`` out. A sandwich layer returns its MLP output
        before ``post_feedforward_layernorm``: the caller hands that norm to the next layer as
        ``pending_norm`` (or applies it), so norm, residual add and the next input norm are one pass."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        elif pending_norm is not None:
            hidden, residual = norm_add_norm(pending_norm, self.input_layernorm, hidden, residual)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rotary, rope)
        mlp = getattr(self, self.mlp_name)
        if not self.sandwich:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return mlp(hidden), residual
        hidden, residual = norm_add_norm(self.post_attention_layernorm, self.pre_feedforward_layernorm, hidden,
                                         residual)
        return mlp(hidden), residual


class DecoderModel(nn.Module):
    """This pipeline stage's part of the model (all of it with one stage)."""

    def __init__(self, config: Any, spec: DecoderSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "model") -> None:
        super().__init__()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.embed_tokens = pp_module(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                                     quant_config, f"{prefix}.embed_tokens"),
                                      first=True, last=tied)
        self.embed_scale = config.hidden_size ** 0.5 if spec.scale_embeddings else None
        windows = layer_sliding_windows(config)

        def layer(layer_prefix: str) -> DecoderLayer:
            i = int(layer_prefix.rsplit(".", 1)[1])
            return DecoderLayer(config, i, spec, windows[i], quant_config, layer_prefix)
        self.start_layer, self.end_layer, self.layers = make_layers(config.num_hidden_layers, layer,
                                                                    f"{prefix}.layers")
        self.norm = pp_module(lambda: spec.norm(config.hidden_size, config.rms_norm_eps), last=True)
        # One cos/sin table per distinct RoPE setting, shared by its layers; gathered once per step.
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        ropes = [get_rope_config(config, types[i]) for i in range(config.num_hidden_layers)]
        distinct = list(dict.fromkeys(ropes))
        self.rotary_embs = nn.ModuleList(RotaryEmbedding(head_dim(config), config.max_position_embeddings, r)
                                         for r in distinct)
        self.rope_index = [distinct.index(r) for r in ropes]

    @property
    def rotary_emb(self) -> RotaryEmbedding:
        """The first (for most families the only) RoPE table."""
        return self.rotary_embs[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale is not None:   # as HF: the scale rounded to the activation dtype first
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        return hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        hidden, residual = stage_input(self.embed, input_ids, intermediate_tensors)
        if residual is None and hidden.device.type == "cpu":   # GGUF blocks: a decode step in one C call
            out = fused_decode(self, hidden, positions, get_attention_metadata())
            if out is not None:
                return out
        states = [r.prepare(positions) for r in self.rotary_embs]
        pending = None   # a sandwich layer's post-feed-forward norm, applied with the next add and norm
        for i in range(self.start_layer, self.end_layer):
            r = self.rope_index[i]
            layer = self.layers[i]
            hidden, residual = layer(hidden, residual, self.rotary_embs[r], states[r], pending)
            pending = layer.post_feedforward_layernorm if layer.sandwich else None
        if pending is not None:
            if not isinstance(self.norm, PPMissingLayer):   # the last stage: final norm fused in too
                return norm_add_norm(pending, self.norm, hidden, residual)[0]
            hidden = pending(hidden)
        return stage_output(self.norm, hidden, residual)


class DecoderForCausalLM(nn.Module):
    """A decoder-only family; parameters are created uninitialised, a loader fills them.

    Subclasses set ``spec`` (and nothing else, for most families)."""

    spec: ClassVar[DecoderSpec] = DecoderSpec()

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = DecoderModel(config, self.spec, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens   # a PPMissingLayer too, except on the last stage
        else:
            self.lm_head = pp_module(lambda: ParallelLMHead(config.vocab_size, config.hidden_size,
                                                            quant_config=quant_config, prefix="lm_head"), last=True)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None) or None
        self._experts = expert_params_mapping(*self.spec.experts) if self.spec.experts else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """``input_ids``, ``positions``: int64 ``[T]`` -> hidden states ``[T, hidden_size]`` on the
        last pipeline stage, the ``IntermediateTensors`` for the next stage on the others (which
        take the previous stage's as ``intermediate_tensors``)."""
        return self.model(input_ids, positions, intermediate_tensors)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[N, vocab_size]`` for hidden states ``[N, hidden_size]``."""
        return compute_lm_logits(self.lm_head, hidden, self.final_logit_softcapping)

    def _map_name(self, name: str) -> tuple[str, object]:
        """(our parameter name, shard id) of checkpoint tensor ``name``."""
        for old, new in self.spec.renames:
            name = name.replace(old, new)
        if self._experts is not None and (hit := self._experts(name)) is not None:
            return hit
        for fused, part, sid in STACKED_PARAMS:
            if part in name:
                return name.replace(part, fused), sid
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into our (fused, sharded) parameters.

        Returns the names of the parameters that received data. A checkpoint without
        ``lm_head.weight`` gets its LM head tied to the embedding.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unknown: list[str] = []
        # An untied last stage without the embedding, if the checkpoint has no lm_head: fill it from this.
        embed_for_head: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if self.tie_word_embeddings and name.startswith("lm_head."):
                continue  # some tied checkpoints store a copy of the embedding
            name, shard_id = self._map_name(name)
            if name not in params and f"model.{name}" in params:  # bare decoder checkpoints
                name = f"model.{name}"
            param = params.get(name)
            if param is None:
                if is_pp_missing_parameter(name, self):
                    suffix = name.removeprefix("model.embed_tokens.")
                    if suffix != name and f"lm_head.{suffix}" in params:
                        embed_for_head[suffix] = tensor
                    continue  # another pipeline stage's weight
                unknown.append(name)
                continue
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                raise ValueError(f"parameter {name} has no weight_loader")
            try:
                loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"while loading {name}: {e}") from None
            loaded.add(name)
        if unknown:
            logger.warning("Ignored %d checkpoint tensors with no matching parameter: %s",
                           len(unknown), ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
        # (a plain table, or GGUF blocks and their type: the quantized head then is the embedding module)
        for suffix in ("weight", "qweight_type", "qweight"):
            head = f"lm_head.{suffix}"
            if self.tie_word_embeddings or head not in params or head in loaded:
                continue
            if f"model.embed_tokens.{suffix}" in loaded:
                if suffix == "weight":
                    self.lm_head.weight = self.model.embed_tokens.weight
                else:
                    self.lm_head = self.model.embed_tokens
                    break
            elif suffix in embed_for_head:
                params[head].weight_loader(params[head], embed_for_head[suffix])
                loaded.add(head)
        return loaded
