"""Qwen2 / Qwen2.5 (bias on q/k/v, none on o) and Qwen3 (per-head q/k RMSNorm, no biases)."""
from __future__ import annotations

from aphrodite.modeling.models.decoder import DecoderForCausalLM, DecoderSpec


class Qwen2ForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec(qk_norm=True)
