"""FP8 (e4m3) activation quantization and the W8A8 matmul it feeds.

``per_token_quant_fp8`` scales each row of ``x`` by its own ``amax / 448`` (dynamic, per token) or by a
given per-tensor scale (static, from a checkpoint's ``input_scale``) and rounds to float8_e4m3fn in one
launch (one program per row, read once when it fits in registers: up to 16k features). ``scaled_mm_fp8``
multiplies that by an fp8 weight with per-output-channel scales through ``torch._scaled_mm`` (rowwise
scaling: cuBLASLt/CUTLASS on Hopper).
"""
from __future__ import annotations

import torch

from aphrodite.kernels.triton_utils import LazyKernel, next_pow2, tl, use_triton

__all__ = ["FP8_DTYPE", "FP8_MAX", "per_token_quant_fp8", "per_token_quant_fp8_ref", "quantize_weight_fp8",
           "scaled_mm_fp8", "scaled_mm_fp8_ref"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)   # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float ``[N, K]`` weight -> (fp8 ``[N, K]``, fp32 per-output-channel scales ``[N]``)."""
    amax = w.abs().amax(dim=1).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def per_token_quant_fp8_ref(x: torch.Tensor, static_scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scales [M, 1])."""
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    else:
        scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm,
                            STATIC: tl.constexpr, BLOCK: tl.constexpr, FP8MAX: tl.constexpr,
                            MIN_SCALE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if BLOCK >= K:      # the whole row in registers: one read
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8MAX, MIN_SCALE)
        tl.store(s_ptr + row, scale)
        q = tl.minimum(tl.maximum(x * (1.0 / scale), -FP8MAX), FP8MAX)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.maximum(tl.max(amax, 0) / FP8MAX, MIN_SCALE)
        tl.store(s_ptr + row, scale)
        inv = 1.0 / scale
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=m, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x * inv, -FP8MAX), FP8MAX)
            tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=m)


_per_token_quant = LazyKernel(_per_token_quant_kernel)


def per_token_quant_fp8(x: torch.Tensor, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (or static per-tensor) fp8 quantization of ``x [M, K]``; one launch on CUDA."""
    if not use_triton(x):
        return per_token_quant_fp8_ref(x, static_scale)
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(16384, next_pow2(k))        # rows up to 16k (all of Llama's) are read once
        _per_token_quant(x.device)[(m,)](
            x, q, s, static_scale if static_scale is not None else s, k, x.stride(0), q.stride(0),
            STATIC=static_scale is not None, BLOCK=block, FP8MAX=FP8_MAX, MIN_SCALE=_MIN_SCALE,
            num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return q, s


def scaled_mm_fp8_ref(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(xq * x_scale) @ (w * w_scale)^T in fp32: xq [M, K] fp8, x_scale [M, 1], w [N, K] fp8, w_scale [N]."""
    out = (xq.float() * x_scale) @ (w.float() * w_scale.float().reshape(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_mm_fp8(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 matmul with per-token activation and per-channel weight scales; ``torch._scaled_mm`` on CUDA."""
    if not xq.is_cuda:
        return scaled_mm_fp8_ref(xq, x_scale, w, w_scale, out_dtype, bias)
    out = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.float().reshape(1, -1), out_dtype=out_dtype)
    return out if bias is None else out.add_(bias)
