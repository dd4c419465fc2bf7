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
