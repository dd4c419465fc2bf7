"""Which model class serves which HF ``architectures`` name."""
from __future__ import annotations

from torch import nn

from aphrodite.modeling.models.llama import LlamaForCausalLM, MistralForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for ``architecture``; ``ValueError`` naming the supported ones otherwise."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"Model architecture {architecture!r} is not supported. Supported architectures: "
                         f"{', '.join(sorted(ARCHITECTURES))}.") from None
