"""RMSNorm / fused residual-add + RMSNorm: Triton vs reference vs an independent HF-style formula."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from aphrodite.kernels.triton_utils import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Transcription of transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [96, 256])
def test_reference_matches_hf(dtype: torch.dtype, hidden: int) -> None:
    x = torch.randn(5, hidden).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-6), hf_rms_norm(x, w, 1e-6), rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [96, 256])
def test_rms_norm(device: torch.device, dtype: torch.dtype, hidden: int) -> None:
    x = (3 * torch.randn(2, 3, hidden)).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(device)
    out = rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5), rtol=TOL[dtype][0], atol=TOL[dtype][1])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm(device: torch.device, dtype: torch.dtype) -> None:
    hidden = 160
    base = (2 * torch.randn(7, 2 * hidden)).to(dtype).to(device)
    x = base[:, :hidden]                     # a strided view, as from a fused projection
    res = torch.randn(7, hidden).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(device)
    x_before, res_before = x.clone(), res.clone()
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
    # Exact on GPU; Triton's interpreter rounds fp32->bf16 toward zero, so allow one bf16 ulp there.
    ulp = 0.0 if device.type == "cuda" or dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(new_res, ref_res, rtol=ulp, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    torch.testing.assert_close(ref_res, (x_before.float() + res_before.float()).to(dtype), rtol=0, atol=0)
    assert torch.equal(x, x_before) and torch.equal(res, res_before), "inputs must not be modified"
