"""Random quantized weights for the GPU quantization benchmarks: one projection in every format they time."""
from __future__ import annotations

import torch


def random_weights(k: int, n: int, gen: torch.Generator):
    """``(int4, fp8, bf16)`` weights of one ``[K in, N out]`` projection: AWQ-style int4 codes with group-128
    scales and zeros, a bf16 weight (std 0.02) and its per-channel FP8 quantization."""
    from aphrodite.kernels.fp8_quant import quantize_weight_fp8
    from aphrodite.kernels.int4_matmul import FMT_FP8, QuantWeight, repack_int4
    dev = torch.device("cuda")
    codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, device=dev, generator=gen)
    scales = (torch.rand(k // 128, n, device=dev, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // 128, n), device=dev, generator=gen).to(torch.bfloat16)
    w4 = repack_int4(codes, scales, zeros, 128)
    wf = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02
    q8, s8 = quantize_weight_fp8(wf)
    w8 = QuantWeight(FMT_FP8, q8, s8.reshape(1, n).contiguous(), k, n, k)
    return w4, w8, wf
