"""Tiny random configs of every supported family, built with transformers (the HF references of
``tests/modeling/test_families.py`` and of ``benchmarks/gpu/check_families_gpu.py``, which runs where the
tests are not copied). Windows are shorter than the test prompts."""
from __future__ import annotations

from typing import Any

import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
WINDOW = 12
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (transformers config class name, overrides).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                   "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, shared_expert_intermediate_size=48, norm_topk_prob=False,
                                         num_hidden_layers=3, mlp_only_layers=[1], **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, norm_topk_prob=True, head_dim=24, **MOE)),
    "gemma2": ("Gemma2Config", dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                                    layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=3.0,
                                    final_logit_softcapping=6.0, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, original_max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
        "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0], "original_max_position_embeddings": 64})),
}
SLIDING = {"mistral", "mixtral", "gemma2", "gemma3", "phi3"}


def make_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The HF model of ``family``, fp32, eval, with random norms, biases and decisive routers."""
    import transformers
    config_name, overrides = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():   # norms and biases random too, so one loaded wrong (or not at all) shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if family.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith(("mlp.gate.weight", "router.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0.0, 1.0)   # decisive routing: ties between experts would make top-k arbitrary
    return model
