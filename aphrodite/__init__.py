"""Aphrodite: an LLM inference and serving engine."""
from aphrodite.lora.request import LoRARequest
from aphrodite.outputs import CompletionOutput, RequestOutput
from aphrodite.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import aphrodite` stays light (torch loads only when the engine is used).
    if name == "LLM":
        from aphrodite.endpoints.llm import LLM
        return LLM
    raise AttributeError(name)
