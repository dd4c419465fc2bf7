"""Which model class serves which HF ``architectures`` name."""
from __future__ import annotations

from torch import nn

from aphrodite.modeling.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from aphrodite.modeling.models.llama import LlamaForCausalLM, MistralForCausalLM
from aphrodite.modeling.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from aphrodite.modeling.models.phi3 import Phi3ForCausalLM
from aphrodite.modeling.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for ``architecture``; ``ValueError`` naming the supported ones otherwise."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"Model architecture {architecture!r} is not supported. Supported architectures: "
                         f"{', '.join(sorted(ARCHITECTURES))}.") from None
