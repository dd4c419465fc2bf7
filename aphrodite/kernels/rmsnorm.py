"""RMSNorm, fused residual-add + RMSNorm, and norm + add + norm, one row per program, fp32 accumulation.

Rounding follows Hugging Face Llama so that logits match it: the residual sum is rounded to the
activation dtype, normalised in fp32, rounded to the dtype, then multiplied by the weight (Gemma's
``(1 + w)`` form keeps the weight multiply in fp32 and rounds once, as HF Gemma does).
Fusing the add saves a full read+write of the hidden state per layer. ``norm_add_norm`` is the
sandwich between two blocks (Gemma 2/3: a block's output norm, the residual add, the next block's
input norm) as one launch instead of two: at batch 1 each launch costs more than its bytes.
"""
from __future__ import annotations

import torch

from aphrodite.kernels.triton_utils import HAS_TRITON, DeviceFunction, LazyKernel, next_pow2, tl, use_triton

__all__ = ["fused_add_rms_norm", "fused_add_rms_norm_ref", "gemma_rms_norm", "gemma_rms_norm_ref", "norm_add_norm",
           "norm_add_norm_ref", "rms_norm", "rms_norm_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``, statistics in fp32."""
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    normed = (xf * torch.rsqrt(var + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def gemma_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Gemma's RMSNorm: ``(x_hat * (1 + weight)).to(dtype)``, everything in fp32 before the one rounding."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``; the sum is rounded to ``x.dtype`` first."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual


def _normed_fn(x, w, n_cols, eps, GEMMA: tl.constexpr):
    """fp32 ``rms_norm(x) * w`` of one row (masked lanes hold 0; ``w`` already loaded, in fp32), rounded as
    the references are before the caller's final cast: Llama rounds the normalised row to ``x``'s dtype
    before the weight."""
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    if GEMMA:   # Gemma: x_hat * (1 + w), all in fp32, one rounding at the end
        return xf * rstd * (w + 1.0)
    return (xf * rstd).to(x.dtype).to(tl.float32) * w


_normed = DeviceFunction(_normed_fn) if HAS_TRITON else _normed_fn


def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, w0_ptr, out_ptr, res_out_ptr, n_cols, eps, eps0,
                     stride_x, stride_r, stride_o, stride_ro,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr = False,
                     PRE_NORM: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    # Every load is issued before the first reduction: at one row a program waits on memory latency, and
    # loads placed after a reduction's barrier would wait in turn.
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
    if PRE_NORM:   # x <- rms_norm(x, w0), rounded to the dtype, before the residual add
        w0 = tl.load(w0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = _normed(x, w0, n_cols, eps0, GEMMA).to(x_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    y = _normed(x, w, n_cols, eps, GEMMA)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_rms_norm = LazyKernel(_rms_norm_kernel)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, gemma: bool = False, pre_weight: torch.Tensor | None = None,
            pre_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    x2 = _rows(x, n)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o2 = out.view(-1, n)
    if residual is not None:
        r2 = _rows(residual, n)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ro2 = res_out.view(-1, n)
    else:
        r2, res_out, ro2 = x2, None, o2
    rows = x2.shape[0]
    if rows:
        block = next_pow2(n)
        warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
        w = weight.contiguous()
        _rms_norm(x.device)[(rows,)](
            x2, r2, w, w if pre_weight is None else pre_weight.contiguous(), o2, ro2, n, eps, pre_eps,
            x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
            BLOCK=block, HAS_RESIDUAL=residual is not None, GEMMA=gemma, PRE_NORM=pre_weight is not None,
            num_warps=warps)
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension; Triton on CUDA (or under TRITON_INTERPRET), else the reference."""
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass over the hidden state."""
    if not use_triton(x):
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    out, res_out = _launch(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gemma's RMSNorm, ``x_hat * (1 + weight)`` in fp32 (with ``residual``: of ``x + residual``, returning
    ``(normed, x + residual)``), in one Triton pass; ``x`` must be where Triton runs."""
    out, res_out = _launch(x, residual, weight, eps, gemma=True)
    return out if residual is None else (out, res_out)


def norm_add_norm_ref(x: torch.Tensor, residual: torch.Tensor, first_weight: torch.Tensor, weight: torch.Tensor,
                      first_eps: float, eps: float, gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(norm0(x) + residual), norm0(x) + residual)``: each norm's output and the sum rounded to
    ``x.dtype`` as the unfused modules round them."""
    norm = gemma_rms_norm_ref if gemma else rms_norm_ref
    h = norm(x, first_weight, first_eps)
    new_residual = (h.float() + residual.float()).to(x.dtype)
    return norm(new_residual, weight, eps), new_residual


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor, first_weight: torch.Tensor, weight: torch.Tensor,
                  first_eps: float, eps: float, gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm_add_norm_ref`` in one pass over the hidden state (Triton on CUDA or under TRITON_INTERPRET,
    else the reference); ``gemma`` picks the ``(1 + w)`` form for both norms."""
    if not use_triton(x):
        return norm_add_norm_ref(x, residual, first_weight, weight, first_eps, eps, gemma)
    out, res_out = _launch(x, residual, weight, eps, gemma, pre_weight=first_weight, pre_eps=first_eps)
    assert res_out is not None
    return out, res_out
