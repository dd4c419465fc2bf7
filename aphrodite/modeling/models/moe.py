"""The mixture-of-experts families: Mixtral, Qwen2-MoE (with a gated shared expert) and Qwen3-MoE.

Only the feed-forward block differs from the dense decoder: ``SparseMoeBlock`` (router, routed
experts, optional shared expert) on the layers the config makes sparse, a dense ``GatedMLP`` on the
others (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from aphrodite.modeling.layers.moe import SparseMoeBlock
from aphrodite.modeling.layers.quantization import QuantizationConfig
from aphrodite.modeling.models.decoder import DecoderForCausalLM, DecoderSpec, dense_mlp


def mixtral_moe(config: Any, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
    """Mixtral: softmax over the router, top-k weights always renormalized."""
    return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                          config.intermediate_size, renormalize=True, hidden_act=config.hidden_act,
                          quant_config=quant_config, prefix=prefix)


def qwen_moe(config: Any, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
    """Qwen2/3-MoE: sparse where the config says, ``norm_topk_prob`` renormalizes, Qwen2-MoE's shared expert."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    sparse = (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
              and config.num_experts > 0 and (layer_idx + 1) % step == 0)
    if not sparse:
        return dense_mlp(config, layer_idx, quant_config, prefix)
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                          config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                          hidden_act=config.hidden_act,
                          shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
                          quant_config=quant_config, prefix=prefix)


class MixtralForCausalLM(DecoderForCausalLM):
    # Checkpoints: block_sparse_moe.{gate, experts.N.w1/w3/w2}; transformers 5 in memory: mlp.{...}.
    spec = DecoderSpec(mlp=mixtral_moe, mlp_name="block_sparse_moe", renames=((".mlp.", ".block_sparse_moe."),),
                       experts=("w1", "w3", "w2"))


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec(qkv_bias=True, o_bias=False, mlp=qwen_moe, experts=("gate_proj", "up_proj", "down_proj"))


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    spec = DecoderSpec(qk_norm=True, mlp=qwen_moe, experts=("gate_proj", "up_proj", "down_proj"))
