"""The fused per-head q/k RMSNorm against the definition (float64) and the plain RMSNorm reference."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.qk_norm import qk_rms_norm
from aphrodite.kernels.rmsnorm import rms_norm_ref
from aphrodite.kernels.triton_utils import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def definition(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    x = x.double()
    scale = (1.0 + w.double()) if gemma else w.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


@pytest.mark.parametrize("t,nq,nk,d,gemma", [(3, 4, 2, 16, False), (2, 6, 1, 24, True), (1, 32, 4, 128, False)])
def test_qk_norm_matches_definition(device, t, nq, nk, d, gemma) -> None:
    """fp32, rows strided as the split of a fused qkv output (v after k), d not a power of 2 included."""
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(t, (nq + 2 * nk) * d, generator=g) * 3
    qw, kw = torch.randn(d, generator=g), torch.randn(d, generator=g)
    q, k = qk_rms_norm(qkv.to(device), qw.to(device), kw.to(device), nq, nk, d, 1e-6, gemma)
    want_q = definition(qkv[:, :nq * d].reshape(t, nq, d), qw, 1e-6, gemma).reshape(t, -1)
    want_k = definition(qkv[:, nq * d:(nq + nk) * d].reshape(t, nk, d), kw, 1e-6, gemma).reshape(t, -1)
    assert q.is_contiguous() and k.is_contiguous()
    torch.testing.assert_close(q.cpu().double(), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.cpu().double(), want_k, rtol=1e-5, atol=1e-5)


def test_qk_norm_bf16_matches_rms_norm(device) -> None:
    t, nq, nk, d = 5, 4, 2, 32
    qkv = torch.randn(t, (nq + 2 * nk) * d).bfloat16()
    qw, kw = torch.randn(d).bfloat16(), torch.randn(d).bfloat16()
    q, k = qk_rms_norm(qkv.to(device), qw.to(device), kw.to(device), nq, nk, d, 1e-6)
    want_q = rms_norm_ref(qkv[:, :nq * d].reshape(t, nq, d), qw, 1e-6).reshape(t, -1)
    want_k = rms_norm_ref(qkv[:, nq * d:(nq + nk) * d].reshape(t, nk, d), kw, 1e-6).reshape(t, -1)
    # one bf16 step: the interpreter truncates to bf16 where the GPU (and torch) round to nearest
    torch.testing.assert_close(q.cpu().float(), want_q.float(), rtol=2 ** -6, atol=2 ** -6)
    torch.testing.assert_close(k.cpu().float(), want_k.float(), rtol=2 ** -6, atol=2 ** -6)
