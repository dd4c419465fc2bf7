"""Per-head RMSNorm of the query and key heads of a fused qkv projection (Qwen3, Gemma3), one launch.

The norms read ``q``/``k`` as strided views of ``qkv [T, (nq + 2 nk) * d]``; two ``RMSNorm`` calls on
them first copy each view contiguous, so a layer spends four launches where this kernel spends one
(at batch 1 under CUDA graphs, launches are most of a step). One program per token normalises all of
its ``nq + nk`` heads; rounding is ``kernels.rmsnorm``'s (HF Llama's, or Gemma's ``(1 + w)`` in fp32).
"""
from __future__ import annotations

import torch

from aphrodite.kernels.rmsnorm import rms_norm_ref
from aphrodite.kernels.triton_utils import LazyKernel, next_pow2, tl, use_triton

__all__ = ["qk_rms_norm", "qk_rms_norm_ref"]


def qk_rms_norm_ref(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_q_heads: int,
                    num_kv_heads: int, head_dim: int, eps: float,
                    gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [T, nq * d], k [T, nk * d])``, each head normalised over its ``d`` values."""
    t, d = qkv.shape[0], head_dim
    q = qkv[:, :num_q_heads * d].reshape(t, num_q_heads, d)
    k = qkv[:, num_q_heads * d:(num_q_heads + num_kv_heads) * d].reshape(t, num_kv_heads, d)

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not gemma:
            return rms_norm_ref(x, w, eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)
    return norm(q, q_weight).reshape(t, -1), norm(k, k_weight).reshape(t, -1)


def _qk_norm_kernel(qkv_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, stride_t, nq, nk, d, eps,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, GEMMA: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_D)
    c_ok = c < d
    m = (h < nq + nk)[:, None] & c_ok[None, :]
    x = tl.load(qkv_ptr + t * stride_t + h[:, None] * d + c[None, :], mask=m, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / d + eps)
    is_q = (h < nq)[:, None]
    wq = tl.load(qw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    wk = tl.load(kw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    w = tl.where(is_q, wq[None, :], wk[None, :])
    if GEMMA:
        normed = xf * rstd[:, None]
        w = w + 1.0
    else:
        normed = (xf * rstd[:, None]).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    y = (normed * w).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + t * nq * d + h[:, None] * d + c[None, :], y, mask=m & is_q)
    k_head = tl.where(h < nq, 0, h - nq)
    tl.store(k_ptr + t * nk * d + k_head[:, None] * d + c[None, :], y, mask=m & (h >= nq)[:, None])


_qk_norm = LazyKernel(_qk_norm_kernel)


def qk_rms_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_q_heads: int,
                num_kv_heads: int, head_dim: int, eps: float,
                gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``qk_rms_norm_ref`` in one Triton launch on CUDA (or under TRITON_INTERPRET); ``qkv``'s rows may be
    strided (a view) but each row's values must be contiguous."""
    if not use_triton(qkv) or qkv.stride(-1) != 1:
        return qk_rms_norm_ref(qkv, q_weight, k_weight, num_q_heads, num_kv_heads, head_dim, eps, gemma)
    t = qkv.shape[0]
    q = torch.empty(t, num_q_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, num_kv_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        block_h, block_d = next_pow2(num_q_heads + num_kv_heads), next_pow2(head_dim)
        _qk_norm(qkv.device)[(t,)](
            qkv, q_weight.contiguous(), k_weight.contiguous(), q, k, qkv.stride(0), num_q_heads, num_kv_heads,
            head_dim, eps, BLOCK_H=block_h, BLOCK_D=block_d, GEMMA=gemma,
            num_warps=4 if block_h * block_d <= 8192 else 8)
    return q, k
