"""The Hugging Face transformers baseline of ``--baseline hf``.

Every benchmark figure is also a ratio against plain ``model.generate()`` on the same
weights, dtype, device and workload, so the numbers say what the engine buys.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aphrodite.benchmarks.common import ResolvedModel

if TYPE_CHECKING:
    import torch
    from torch import nn


def load_hf_model(model: ResolvedModel) -> nn.Module:
    """``AutoModelForCausalLM`` for the model the engine served: from a HF directory, from a GGUF
    (dequantized to ``model.dtype``, as the engine does), or from the config alone with dummy weights."""
    import torch
    from transformers import AutoModelForCausalLM
    if model.load_format == "dummy":
        from aphrodite.modeling.loader.dummy_loader import initialize_dummy_weights
        # Built directly on the device: a random init of an 8B model on the CPU takes minutes.
        with torch.device(model.device):
            hf = AutoModelForCausalLM.from_config(model.hf_config, dtype=model.dtype)
        # Same distribution as the engine's dummy weights, so activations stay alike.
        initialize_dummy_weights(hf, seed=model.seed)
    elif model.gguf_file is not None:
        import os
        directory = os.path.dirname(os.path.abspath(model.path))
        hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=model.gguf_file, dtype=model.dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=model.dtype)
    return hf.to(model.device).eval()


def _token_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _generation_config(hf: nn.Module, output_len: int, temperature: float) -> Any:
    """Exactly ``output_len`` new tokens (EOS is masked until then, like ``ignore_eos``) and the
    engine's sampling: plain temperature sampling with no top-k (HF would default to top_k=50)."""
    from transformers import GenerationConfig
    config = hf.config
    eos = getattr(config, "eos_token_id", None)
    pad = _token_id(getattr(config, "pad_token_id", None))
    if pad is None:
        pad = _token_id(eos) if eos is not None else 0
    kwargs: dict[str, Any] = dict(max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=pad,
                                  eos_token_id=eos, use_cache=True)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    return GenerationConfig(**kwargs)


def _left_padded(prompts: Sequence[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFRunner:
    """A loaded HF model that runs batches of token-id prompts the way the engine's benchmark does."""

    def __init__(self, model: ResolvedModel, temperature: float, seed: int) -> None:
        import torch
        self.model = model
        self.temperature = temperature
        start = time.perf_counter()
        self.hf = load_hf_model(model)
        _sync(model.device)
        self.load_seconds = time.perf_counter() - start
        torch.manual_seed(seed)
        print(f"HF baseline load: {self.load_seconds:.2f} s", flush=True)

    def generate(self, prompts: Sequence[list[int]], output_len: int, n: int = 1) -> int:
        """Generate for one padded batch; returns the number of new tokens (all sequences)."""
        import torch
        # n samples per prompt as n rows: equal work, and valid for greedy too (HF refuses
        # num_return_sequences > 1 without sampling).
        rows = [p for p in prompts for _ in range(n)]
        config = _generation_config(self.hf, output_len, self.temperature)
        ids, mask = _left_padded(rows, config.pad_token_id, self.model.device)
        with torch.inference_mode():
            out = self.hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        _sync(self.model.device)
        return int(out.shape[0]) * (int(out.shape[1]) - int(ids.shape[1]))

    def warmup(self, prompt: list[int]) -> None:
        """One short untimed call: first-call costs (kernels, allocator) are not generation speed."""
        self.generate([prompt], output_len=2)

    def run_batches(self, prompts: Sequence[list[int]], output_len: int, n: int,
                    batch_size: int) -> tuple[float, int]:
        """(seconds, output tokens) for all ``prompts`` in padded batches of ``batch_size``."""
        generated = 0
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            generated += self.generate(prompts[i:i + batch_size], output_len, n)
        return time.perf_counter() - start, generated
