"""Linear layers on the CPU with weights pre-packed once into oneDNN's blocked layout.

``F.linear`` on the CPU reorders (packs) the weight into the GEMM's blocked layout on every
call, which at decode batch sizes costs as much as the multiply itself: a step re-packs
every weight of the model. Packing once at load time is what PyTorch's own inductor does
for frozen CPU graphs (``mkldnn._reorder_linear_weight`` + ``mkldnn._linear_pointwise``).
Measured on the CI machine (30 layers of SmolLM2's shapes, weights cold in cache), fp32
64 rows: 130 -> 185 GFLOP/s; bf16 64 rows: 284 -> 342; 2048 rows: +4-15%; the fp32
LM head at 64 rows 42 -> 18.5 ms.

A packed tensor keeps the weight's shape but not its memory layout, so nothing but
``linear`` may read it. ``APHRODITE_CPU_PACKED_WEIGHTS=0`` turns packing off.
"""
from __future__ import annotations

import logging
import os
from functools import cache

import torch

logger = logging.getLogger(__name__)

# The batch size oneDNN picks its blocking for; one layout serves every batch size (measured:
# packed for 64 rows it beats per-call packing from 8 to 2048 rows).
PACK_BATCH_HINT = 64


@cache
def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build and CPU can run packed linear layers in ``dtype`` (float32 or
    bfloat16; oneDNN's bf16 path needs AVX-512 or AVX-NE-CONVERT) and packing is not turned off."""
    if os.environ.get("APHRODITE_CPU_PACKED_WEIGHTS", "1") == "0" or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        # Run it once: some builds register the op but cannot execute it for this dtype here.
        w = torch.ones(8, 16, dtype=dtype)
        got = linear(torch.ones(2, 16, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT))
        return bool(torch.all(got == 16.0))
    except (AttributeError, RuntimeError) as e:
        logger.info("oneDNN weight packing unavailable for %s (%s); linear layers use F.linear", dtype, e)
        return False


def supports(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be packed here: a 2-D CPU float32/bfloat16 tensor this build runs packed."""
    return weight.device.type == "cpu" and weight.dim() == 2 and available(weight.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (row-major) in oneDNN's blocked layout; readable only by ``linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``packed = pack(weight)``."""
    k = x.shape[-1]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, k).contiguous(), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])
