"""Phi-3: checkpoints already fuse ``qkv_proj`` and ``gate_up_proj`` (the loaders split them per rank);
LongRoPE scaling and the sliding window come from the config through the shared layers."""
from __future__ import annotations

from aphrodite.modeling.models.decoder import DecoderForCausalLM, DecoderSpec


class Phi3ForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec()
