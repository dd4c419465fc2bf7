"""Gemma 2 and Gemma 3 (text): ``(1 + w)`` RMSNorms in a sandwich around attention and MLP, GeGLU,
embeddings scaled by ``sqrt(hidden_size)``, softmax scale ``query_pre_attn_scalar ** -0.5``, local
(sliding-window) and global layers per ``config.layer_types``. Gemma 2 soft-caps attention scores and
final logits (read from its config); Gemma 3 normalizes q/k per head and gives its local and global
layers different RoPE settings (``rope_parameters`` per layer type)."""
from __future__ import annotations

from aphrodite.modeling.layers.norm import GemmaRMSNorm
from aphrodite.modeling.models.decoder import DecoderForCausalLM, DecoderSpec


class Gemma2ForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec(norm=GemmaRMSNorm, sandwich_norms=True, scale_embeddings=True, query_pre_attn_scalar=True)


class Gemma3ForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec(norm=GemmaRMSNorm, sandwich_norms=True, scale_embeddings=True, query_pre_attn_scalar=True,
                       qk_norm=True)
