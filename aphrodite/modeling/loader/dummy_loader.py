"""Random weights for benchmarks and tests: only config.json is needed."""
from __future__ import annotations

import torch
from torch import nn


def initialize_dummy_weights(model: nn.Module, low: float = -1e-3, high: float = 1e-3, seed: int = 0) -> None:
    """Fill every parameter with ``U(low, high)`` in place, on its own device (a small range keeps
    activations finite in any dtype, as vLLM's dummy format does). Buffers are left alone."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for param in model.parameters():
            if not param.dtype.is_floating_point:   # integer codes/types: their quant method makes them
                continue
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.uniform_(low, high, generator=gen)
