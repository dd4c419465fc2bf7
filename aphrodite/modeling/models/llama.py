"""Llama, and Mistral (Llama's architecture; its sliding window comes from ``config.sliding_window``).

Everything is the shared decoder's defaults (``decoder.py``): pre-norm RMSNorm blocks, fused q/k/v
and gate/up, SwiGLU, RoPE of any supported scaling.
"""
from __future__ import annotations

from aphrodite.modeling.models.decoder import DecoderForCausalLM, DecoderSpec


class LlamaForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec()


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: every layer attends within ``config.sliding_window`` when it is set."""
