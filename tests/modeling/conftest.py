"""Fixtures for the GGUF loader tests: the default model's file and transformers' reading of it."""
from __future__ import annotations

from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def default_gguf_hf_config(default_gguf_hf_model: Any) -> Any:
    return default_gguf_hf_model.config


@pytest.fixture(scope="session")
def default_gguf_hf_state_dict(default_gguf_hf_model: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in default_gguf_hf_model.state_dict().items()}
