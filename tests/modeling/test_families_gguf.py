"""GGUF files of the supported families: written at test time with ``gguf.GGUFWriter`` (f32 tensors, names
from the gguf package's own HF -> GGUF name map), then loaded by transformers (the reference) and by us.

Configs use only what GGUF metadata carries (transformers rebuilds the config from it); the rest stays at
each config class's defaults, so both sides see the same model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aphrodite.modeling.loader import load_model
from tests.modeling.test_llama import check_prefill_then_decode, hf_logits, model_config

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
# family -> (config class, gguf MODEL_ARCH name, overrides)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", "QWEN2", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "QWEN3", dict(head_dim=128, tie_word_embeddings=False)),   # no key_length in HF map
    "qwen2_moe": ("Qwen2MoeConfig", "QWEN2MOE", dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "QWEN3MOE", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                     tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "PHI3", dict(tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "GEMMA2", dict(head_dim=16, sliding_window=12, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "GEMMA3", dict(head_dim=16, sliding_window=12, tie_word_embeddings=True)),
}


def write_gguf(family: str, path: Path) -> Path:
    """A random tiny model of ``family`` saved as GGUF the way llama.cpp's converter lays it out."""
    import gguf
    import transformers
    config_name, arch_name, overrides = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(BASE["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_key_length(overrides.get("head_dim", 16))
    writer.add_value_length(overrides.get("head_dim", 16))
    if "sliding_window" in overrides:
        writer.add_sliding_window(overrides["sliding_window"])
    if "num_experts" in overrides:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for hf_name, t in model.state_dict().items():
            if "norm" in hf_name:   # random norms, so a norm loaded wrong shows
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue   # tied: llama.cpp writes no output tensor
            arr = t.float().numpy()
            base, _, suffix = hf_name.rpartition(".")
            if base.endswith("experts") and suffix in ("gate_up_proj", "down_proj"):   # stacked experts
                stem = names.get_name(f"{base}.down_proj").removesuffix("_down_exps")
                if suffix == "down_proj":
                    writer.add_tensor(f"{stem}_down_exps.weight", arr)
                else:
                    half = arr.shape[1] // 2
                    writer.add_tensor(f"{stem}_gate_exps.weight", np.ascontiguousarray(arr[:, :half]))
                    writer.add_tensor(f"{stem}_up_exps.weight", np.ascontiguousarray(arr[:, half:]))
                continue
            gguf_name = names.get_name(base)
            assert gguf_name is not None, hf_name
            if family.startswith("gemma") and "norm" in hf_name:
                arr = arr + 1.0    # llama.cpp stores Gemma norms as 1 + w
            if gguf_name.endswith("ffn_gate_inp_shexp"):
                arr = arr.reshape(-1)
            writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_matches_transformers_loading_it(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    path = write_gguf(family, tmp_path / f"{family}.gguf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    cfg = model_config(path, load_format="gguf", hf_config=hf_model.config)
    model = load_model(cfg, torch.device("cpu"))
    ids = torch.randint(3, 320, (30,), generator=torch.Generator().manual_seed(2))
    reference = hf_logits(hf_model, ids)
    assert reference.std() > 0.1
    check_prefill_then_decode(model, reference, ids, prompt_len=20)
