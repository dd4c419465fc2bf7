"""Neox rotary embedding in place: Triton vs reference vs an independent HF-style formula."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.rotary import build_cos_sin_cache, rotary_embedding, rotary_embedding_ref
from aphrodite.kernels.triton_utils import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def inv_freq(rot: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)


def hf_rope(x: torch.Tensor, pos: torch.Tensor, rot: int) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb (rotate_half) in float64 on [T, H, D], first ``rot`` dims."""
    freqs = pos.double()[:, None] * inv_freq(rot).double()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    xr = x[..., :rot].double()
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos + rotated * sin, x[..., rot:].double()], dim=-1)


def make_qk(t: int, hq: int, hkv: int, d: int, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k as strided column slices of one fused qkv projection output."""
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype).to(device)
    return qkv, qkv[:, : hq * d], qkv[:, hq * d:(hq + hkv) * d]


@pytest.mark.parametrize("rot", [64, 32])
def test_reference_matches_hf(rot: int) -> None:
    d, t = 64, 6
    pos = torch.randint(0, 500, (t,))
    cache = build_cos_sin_cache(inv_freq(rot), 512)
    _, q, k = make_qk(t, 4, 2, d, torch.float32, torch.device("cpu"))
    q0, k0 = q.clone().view(t, 4, d), k.clone().view(t, 2, d)
    rotary_embedding_ref(pos, q, k, d, cache)
    # fp32 angles at positions up to 500 carry ~pos * 6e-8 of error.
    torch.testing.assert_close(q.view(t, 4, d).double(), hf_rope(q0, pos, rot), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k.view(t, 2, d).double(), hf_rope(k0, pos, rot), rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,rot,hq,hkv", [(64, 64, 4, 2), (128, 128, 8, 8), (128, 64, 2, 1)])
def test_rotary(device: torch.device, dtype: torch.dtype, d: int, rot: int, hq: int, hkv: int) -> None:
    t = 7
    pos = torch.randint(0, 1000, (t,), device=device)
    cache = build_cos_sin_cache(inv_freq(rot).to(device), 1024)
    qkv, q, k = make_qk(t, hq, hkv, d, dtype, device)
    qkv_ref = qkv.clone()
    q_ref, k_ref = qkv_ref[:, : hq * d], qkv_ref[:, hq * d:(hq + hkv) * d]
    rotary_embedding(pos, q, k, d, cache)
    rotary_embedding_ref(pos, q_ref, k_ref, d, cache)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    # Whole qkv compared: q and k rotated alike, v untouched.
    torch.testing.assert_close(qkv, qkv_ref, rtol=tol, atol=tol)
    assert not torch.isnan(qkv).any()
