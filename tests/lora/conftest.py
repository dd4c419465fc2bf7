"""Two random PEFT LoRA adapters of different ranks over the tiny Llama, made with ``peft`` at test time."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

# (name, rank, alpha, target modules, rsLoRA)
ADAPTERS = {
    "sql": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "poet": (8, 4, ["q_proj", "v_proj", "down_proj", "up_proj"], True),
    "vocab": (4, 8, ["embed_tokens", "lm_head", "o_proj"], False),     # LoRA on the embedding and the LM head
}


def make_adapter(base_dir: str, out: Path, rank: int, alpha: int, targets: list[str], rslora: bool,
                 seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM.from_pretrained(base_dir).float()
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                                            lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:   # PEFT starts B at zero: give both a real, non-zero update
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_dirs(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {name: str(make_adapter(tiny_llama_dir, root / name, *spec, seed=i + 1))
            for i, (name, spec) in enumerate(ADAPTERS.items())}


@functools.lru_cache(maxsize=8)
def _peft_model(base_dir: str, adapter_dir: str | None) -> Any:
    """The reference: transformers' Llama with the adapter applied by peft (or none)."""
    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM.from_pretrained(base_dir).float().eval()
    if adapter_dir is None:
        return base
    from peft import PeftModel
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.fixture(scope="session")
def peft_model() -> Any:
    """``peft_model(base_dir, adapter_dir | None)``: the reference model, as a fixture."""
    return _peft_model
