"""Gemma's fused kernels (Triton; the interpreter on CPU) against HF Gemma 2's own modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aphrodite.kernels.activation import gelu_tanh_and_mul
from aphrodite.kernels.rmsnorm import gemma_rms_norm
from aphrodite.kernels.triton_utils import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_matches_hf(device, dtype) -> None:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(5, 80, generator=g).to(dtype), torch.randn(5, 80, generator=g).to(dtype)
    hf = Gemma2RMSNorm(80, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(80, generator=g) * 0.3)
    w = hf.weight.detach().to(dtype)
    hf = hf.to(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    out = gemma_rms_norm(x.to(device), w.to(device), 1e-6)
    torch.testing.assert_close(out.cpu(), hf(x), **tol)
    out, res = gemma_rms_norm(x.to(device), w.to(device), 1e-6, r.to(device))
    torch.testing.assert_close(res.cpu(), x + r, **tol)   # (the interpreter's bf16 rounding may differ by an ulp)
    torch.testing.assert_close(out.cpu(), hf(x + r), **tol)


def test_gelu_tanh_and_mul_matches_torch(device) -> None:
    x = torch.randn(7, 2 * 200, generator=torch.Generator().manual_seed(1)) * 3
    ref = F.gelu(x[:, :200], approximate="tanh") * x[:, 200:]
    torch.testing.assert_close(gelu_tanh_and_mul(x.to(device)).cpu(), ref, rtol=1e-5, atol=1e-5)


def _norm64(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    x = x.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * ((1.0 + w.double()) if gemma else w.double())


@pytest.mark.parametrize("gemma", [True, False])
def test_norm_add_norm_fp32_matches_float64(device, gemma) -> None:
    """The sandwich kernel (norm, residual add, norm in one pass) against the same math in float64."""
    from aphrodite.kernels.rmsnorm import norm_add_norm
    g = torch.Generator().manual_seed(2)
    hidden = 200   # not a power of two: masked lanes must not enter the statistics
    base = torch.randn(6, 2 * hidden, generator=g) * 4
    x = base[:, :hidden]                     # a strided view, as an attention output slice may be
    r = torch.randn(6, hidden, generator=g)
    w0, w1 = torch.randn(hidden, generator=g) * 0.3, torch.randn(hidden, generator=g) * 0.3
    x_before, r_before = x.clone(), r.clone()
    out, res = norm_add_norm(x.to(device), r.to(device), w0.to(device), w1.to(device), 1e-6, 1e-5, gemma=gemma)
    ref_res = _norm64(x, w0, 1e-6, gemma) + r.double()
    torch.testing.assert_close(res.cpu().double(), ref_res, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu().double(), _norm64(ref_res, w1, 1e-5, gemma), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before) and torch.equal(r, r_before), "inputs must not be modified"


def test_norm_add_norm_bf16_matches_hf_gemma2_modules(device) -> None:
    """bf16 rounding as HF Gemma 2 rounds it: post-attention norm, ``residual + h``, pre-feed-forward norm."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from aphrodite.kernels.rmsnorm import norm_add_norm
    g = torch.Generator().manual_seed(3)
    post, pre = Gemma2RMSNorm(96, eps=1e-6), Gemma2RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        post.weight.copy_(torch.randn(96, generator=g) * 0.3)
        pre.weight.copy_(torch.randn(96, generator=g) * 0.3)
    post, pre = post.to(torch.bfloat16), pre.to(torch.bfloat16)
    x = (torch.randn(5, 96, generator=g) * 3).to(torch.bfloat16)
    r = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        ref_res = r + post(x)
        ref_out = pre(ref_res)
    out, res = norm_add_norm(x.to(device), r.to(device), post.weight.to(device), pre.weight.to(device), 1e-6, 1e-6,
                             gemma=True)
    # (the interpreter's bf16 rounding may differ by an ulp)
    torch.testing.assert_close(res.cpu(), ref_res, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cap_matches_float64(device, dtype) -> None:
    """Final logit soft-capping fused into the cast to float32, against tanh in float64: huge logits (no
    overflow), tiny ones (no cancellation), a strided row view, a vocabulary not a multiple of the block."""
    from aphrodite.kernels.activation import soft_cap
    g = torch.Generator().manual_seed(4)
    vocab = 5000
    base = torch.randn(3, vocab + 7, generator=g) * 40
    base[0, :6] = torch.tensor([1e4, -1e4, 3e-6, -2e-3, 0.0, 1.4])
    x = base.to(dtype)[:, :vocab]
    out = soft_cap(x.to(device), 30.0)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = torch.tanh(x.double() / 30.0) * 30.0
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-6, atol=1e-6)
    assert out[0, 0].item() == pytest.approx(30.0) and out[0, 2].item() == pytest.approx(x[0, 2].item(), rel=1e-5)
