"""silu_and_mul: Triton vs reference vs the unfused HF formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aphrodite.kernels.activation import silu_and_mul, silu_and_mul_ref
from aphrodite.kernels.triton_utils import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def test_reference_matches_unfused() -> None:
    x = 4 * torch.randn(3, 2 * 48)
    torch.testing.assert_close(silu_and_mul_ref(x), F.silu(x[:, :48]) * x[:, 48:], rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 80), (2, 3, 2 * 64), (1, 2 * 1500)])
def test_silu_and_mul(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (4 * torch.randn(*shape)).to(dtype).to(device)
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert not torch.isnan(out).any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, silu_and_mul_ref(x), rtol=tol, atol=tol)
    buf = torch.full_like(out, float("nan"))
    silu_and_mul(x, out=buf)
    torch.testing.assert_close(buf, out, rtol=0, atol=0)
