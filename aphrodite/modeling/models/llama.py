"""Llama (and Mistral without sliding window): a flat token batch in, hidden states out.

``forward(input_ids [T], positions [T]) -> hidden [T, hidden_size]``: no batch dimension, no
padding; the per-sequence layout lives in the attention metadata of the step. The engine
picks the rows it wants and calls ``compute_logits``. Each decoder layer runs q/k/v and
gate/up as single fused matmuls and carries the residual stream through the norms, to keep
the per-layer op count (and Python overhead on CPU decode) low.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from aphrodite.modeling.layers.activation import SiluAndMul
from aphrodite.modeling.layers.attention import Attention
from aphrodite.modeling.layers.embedding import ParallelLMHead, VocabParallelEmbedding, compute_lm_logits
from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from aphrodite.modeling.layers.norm import RMSNorm
from aphrodite.modeling.layers.quantization import QuantizationConfig
from aphrodite.modeling.layers.rotary import RotaryEmbedding, get_rope_config

logger = logging.getLogger(__name__)

# (our fused parameter, checkpoint projection, shard id): the one place HF names map to ours.
_STACKED_PARAMS = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"Llama MLP supports hidden_act='silu' only, got {hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.head_dim = _head_dim(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          num_kv_heads, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=bias, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, self.head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads)

    def forward(self, hidden: torch.Tensor, rotary: RotaryEmbedding, rope: tuple) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        fused = rotary.fused_rope(rope)
        if fused is not None:  # the attention backend rotates q/k in the same pass as its cache write
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return self.o_proj(self.attn(q, k, v, rope=fused))
        # Rotate q and k together (they are adjacent in the fused output), leave v as a view.
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        q, k = rotary.rotate_qk(qk, self.q_size, rope)
        return self.o_proj(self.attn(q, k, v))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bool(getattr(config, "mlp_bias", False)), quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rotary: RotaryEmbedding,
                rope: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rotary, rope)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "model") -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config,
                                                   f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, quant_config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # One table shared by all layers; cos/sin are gathered once per step.
        self.rotary_emb = RotaryEmbedding(_head_dim(config), config.max_position_embeddings,
                                          get_rope_config(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rotary = self.rotary_emb
        rope = rotary.prepare(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rotary, rope)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The Llama family; parameters are created uninitialised, a loader fills them."""

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = LlamaModel(config, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                          prefix="lm_head")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids``, ``positions``: int64 ``[T]`` -> hidden states ``[T, hidden_size]``."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[N, vocab_size]`` for hidden states ``[N, hidden_size]``."""
        return compute_lm_logits(self.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into our (fused, sharded) parameters.

        Returns the names of the parameters that received data. A checkpoint without
        ``lm_head.weight`` gets its LM head tied to the embedding.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unknown: list[str] = []
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if self.tie_word_embeddings and name.startswith("lm_head."):
                continue  # some tied checkpoints store a copy of the embedding
            shard_id: object = None
            for fused, part, sid in _STACKED_PARAMS:
                if part in name:
                    name, shard_id = name.replace(part, fused), sid
                    break
            if name not in params and f"model.{name}" in params:  # bare LlamaModel checkpoints
                name = f"model.{name}"
            param = params.get(name)
            if param is None:
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
        if not self.tie_word_embeddings and not any(n.startswith("lm_head.") for n in loaded):
            if any(n.startswith("model.embed_tokens.") for n in loaded):   # (plain or quantized) table
                self.lm_head = self.model.embed_tokens
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture; sliding-window attention is not applied (full attention)."""

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        window = getattr(config, "sliding_window", None)
        if window and window < config.max_position_embeddings:
            logger.warning("Mistral sliding_window=%d is not implemented; attention is full, which is exact "
                           "only for contexts up to %d tokens.", window, window)
        super().__init__(config, quant_config)
