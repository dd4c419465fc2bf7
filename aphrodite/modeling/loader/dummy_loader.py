"""Random weights for benchmarks and tests: only config.json is needed."""
from __future__ import annotations

import torch
from torch import nn

_CHUNK = 1 << 24   # elements per temporary float32 chunk when filling fp8 parameters


def initialize_dummy_weights(model: nn.Module, low: float = -1e-3, high: float = 1e-3, seed: int = 0) -> None:
    """Fill every parameter in place, on its own device (a small range keeps activations finite in any
    dtype, as vLLM's dummy format does). Buffers are left alone.

    Quantized parameters get values valid for their format: float ones (scales included) ``U(low, high)``,
    fp8 ones the same range scaled up to fp8's, packed integer ones random bits; a parameter with a
    ``dummy_init(param, generator)`` attribute (e.g. GPTQ's ``g_idx``, which must index real groups)
    fills itself."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for param in model.parameters():
            if not param.dtype.is_floating_point:   # integer codes/types: their quant method makes them
                continue
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            custom = getattr(param, "dummy_init", None)
            if custom is not None:
                custom(param.data, gen)
            elif param.dtype.is_floating_point and param.element_size() == 1:
                flat = param.data.view(-1)
                for start in range(0, flat.numel(), _CHUNK):
                    part = flat[start:start + _CHUNK]
                    tmp = torch.empty(part.shape, dtype=torch.float32, device=param.device)
                    part.copy_(tmp.uniform_(-64.0, 64.0, generator=gen))
            elif param.dtype.is_floating_point:
                param.uniform_(low, high, generator=gen)
            else:
                param.random_(generator=gen)
