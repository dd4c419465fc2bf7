"""The C CPU kernels against plain-PyTorch references on random inputs (fp32 and bf16)."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aphrodite.kernels.cpu import ops
from aphrodite.kernels.cpu.build import load_library

pytestmark = pytest.mark.skipif(not ops.available(torch.float32), reason="no C compiler for the CPU kernels")

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [200, 192, 256])   # odd width (portable loop), 16- and 32-multiples (AVX-512)
def test_linear_matches_float64(dtype, rows, bias, k, kernel_build):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(77, k, generator=g).to(dtype)
    b = torch.randn(77, generator=g).to(dtype) if bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    out = ops.linear(x, w, b)
    assert out.dtype == dtype and out.shape == (rows, 77)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


def test_linear_keeps_leading_dims():
    x = torch.randn(2, 1, 64)
    w = torch.randn(32, 64)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-4)


def _reference_decode(q, k_cache, v_cache, tables, lens, scale, window=0, cap=0.0):
    """Gather each sequence's tokens from its blocks and run float64 softmax attention (the last
    ``window`` keys only, scores soft-capped by ``cap``, when given)."""
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        slots = [int(tables[i, t // bs]) * bs + t % bs for t in range(n)]
        k = k_cache.flatten(0, 1)[slots].double().repeat_interleave(hq // hkv, dim=1)   # [n, hq, d]
        v = v_cache.flatten(0, 1)[slots].double().repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].double(), k) * scale
        if cap:
            s = torch.tanh(s / cap) * cap
        if window:
            s[:, :max(0, n - window)] = float("-inf")
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


_VARIANT_FLAGS = {"portable": ("-mno-avx512f",), "avx512-without-bf16": ("-mno-avx512bf16",)}


@pytest.fixture(params=["native", "portable", "avx512-without-bf16"])
def kernel_build(request, monkeypatch):
    """The kernels as built for this CPU, and as built for CPUs without AVX-512 or without its bf16
    dot product (the paths other machines take)."""
    if request.param != "native":
        if platform.machine() != "x86_64":
            pytest.skip("the variants differ only on x86-64")
        if request.param == "avx512-without-bf16" and "avx512f" not in Path("/proc/cpuinfo").read_text():
            pytest.skip("this CPU has no AVX-512")
        lib = load_library(_VARIANT_FLAGS[request.param])
        assert lib is not None
        monkeypatch.setattr(ops, "_lib", lambda: lib)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", [(4, 4, 32, 16), (9, 3, 64, 16), (8, 1, 16, 4), (12, 2, 128, 16),
                                         (16, 2, 64, 32), (6, 6, 96, 8), (10, 1, 256, 16)])
def test_paged_decode_attention_matches_reference(dtype, hq, hkv, d, bs, kernel_build):
    g = torch.Generator().manual_seed(hq * d + bs)
    num_blocks, b = 40, 5
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    lens = torch.tensor([1, bs, bs + 1, 3 * bs - 2, 5 * bs], dtype=torch.int32)
    max_blocks = 6
    tables = torch.randperm(num_blocks, generator=g)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    scale = d ** -0.5
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out.double(), _reference_decode(q, k_cache, v_cache, tables, lens, scale),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,cap", [(5, 0.0), (0, 2.0), (21, 1.5)])
@pytest.mark.parametrize("hq,hkv,d,bs", [(8, 2, 64, 16), (6, 3, 48, 8)])
def test_paged_decode_attention_window_and_soft_cap(dtype, window, cap, hq, hkv, d, bs, kernel_build):
    """Sliding window (Mistral, Gemma 2 local layers) and soft-capped scores (Gemma 2): the kernel must
    skip keys before the window, which start mid-block, and squash scores before the softmax."""
    g = torch.Generator().manual_seed(window + d)
    k_cache = torch.randn(30, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(30, bs, hkv, d, generator=g).to(dtype)
    lens = torch.tensor([1, 4, bs + 3, 3 * bs - 2, 4 * bs], dtype=torch.int32)
    tables = torch.randperm(30, generator=g)[:25].view(5, 5).to(torch.int32)
    q = (3 * torch.randn(5, hq, d, generator=g)).to(dtype)   # large scores, so the cap matters
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, window, cap)
    ref = _reference_decode(q, k_cache, v_cache, tables, lens, d ** -0.5, window, cap)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    assert not torch.allclose(ref, _reference_decode(q, k_cache, v_cache, tables, lens, d ** -0.5), atol=1e-2)


def _reference_rms_norm(x, weight, eps, residual=None):
    """HF Llama's arithmetic: float32 statistics, normalised value cast back before the weight."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)), x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 96, generator=g).to(dtype)
    res = torch.randn(6, 96, generator=g).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    ref, ref_sum = _reference_rms_norm(x, w, 1e-5, res)
    out = ops.rms_norm(x, w, 1e-5, res)
    if with_residual:
        out, summed = out
        assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(out, ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    x = torch.randn(5, 2 * 70, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = F.silu(x[:, :70]) * x[:, 70:]
    torch.testing.assert_close(ops.silu_and_mul(x), ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5)


def _reference_inverse_cdf(logits, uniforms, temperature):
    """float64: the first token whose cumulative probability exceeds the row's uniform."""
    t = torch.where(temperature > 0, temperature, 1.0).double()
    probs = torch.softmax(logits.double() / t[:, None], dim=-1)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None], right=True).squeeze(1)


def test_sample_inverse_cdf_matches_float64_reference():
    g = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(300, 500, generator=g)
    uniforms = torch.rand(300, generator=g, dtype=torch.float64)
    temperature = torch.rand(300, generator=g) * 1.5
    temperature[::7] = 0.0   # greedy rows count as temperature 1 here (the sampler argmaxes them)
    got = ops.sample_inverse_cdf(logits, uniforms, temperature)
    ref = _reference_inverse_cdf(logits, uniforms, temperature)
    assert (got == ref).float().mean() >= 0.99   # rounding may move a draw that lands on a boundary
    near = (got - ref).abs() <= 1
    assert bool(near.all())
    # already-scaled logits (no temperature) draw the same as temperature 1
    assert torch.equal(ops.sample_inverse_cdf(logits, uniforms), ops.sample_inverse_cdf(logits, uniforms,
                                                                                         torch.ones(300)))


def test_sample_inverse_cdf_never_picks_masked_tokens():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 200, generator=g)
    mask = torch.rand(64, 200, generator=g) < 0.9
    mask[:, 17] = False                        # every row keeps at least one token
    logits = logits.masked_fill(mask, float("-inf"))
    for _ in range(20):
        u = torch.rand(64, generator=g, dtype=torch.float64)
        u[:4] = 1.0 - 1e-17                    # the very top of the range
        picks = ops.sample_inverse_cdf(logits, u)
        assert not bool(mask.gather(1, picks[:, None]).any())


def test_sample_inverse_cdf_low_temperature_is_nearly_greedy():
    logits = torch.tensor([[30.0, 29.0, 10.0, 30.0 - 1e-3]])
    u = torch.tensor([0.3], dtype=torch.float64)
    # at T = 1e-4 the top two tokens are 1e-3 apart: weights 1 : exp(-10); the draw must be token 0
    assert int(ops.sample_inverse_cdf(logits, u, torch.tensor([1e-4]))[0]) == 0
    assert int(ops.sample_inverse_cdf(logits, torch.tensor([0.99999], dtype=torch.float64),
                                      torch.tensor([1e-4]))[0]) == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_index_copy(dtype):
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(6, 4 * 16 + 2 * 2 * 16, generator=g).to(dtype)     # q (4 heads) | k (2) | v (2)
    _, k, v = qkv.split([64, 32, 32], dim=-1)
    k, v = k.view(6, 2, 16), v.view(6, 2, 16)                            # strided rows, as in the model
    slots = torch.tensor([5, 0, -1, 17, 3, 30])
    caches = [torch.zeros(4, 8, 2, 16, dtype=dtype) for _ in range(4)]
    ops.write_kv(k, v, caches[0], caches[1], slots)
    keep = slots >= 0
    caches[2].view(-1, 2, 16).index_copy_(0, slots[keep], k[keep])
    caches[3].view(-1, 2, 16).index_copy_(0, slots[keep], v[keep])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [5, 40])   # 40 rows take the OpenMP-parallel loop
def test_rope_write_kv_matches_rotary_then_index_copy(dtype, t):
    """The fused C pass equals PyTorch's rotary (HF's rotate_half form, float64) then a cache write."""
    from aphrodite.modeling.layers.rotary import RopeConfig, RotaryEmbedding
    g = torch.Generator().manual_seed(t)
    hq, hkv, d = 4, 2, 16
    with torch.device("cpu"):
        torch.set_default_dtype(dtype)
        try:
            rotary = RotaryEmbedding(d, 64, RopeConfig(theta=10000.0))
        finally:
            torch.set_default_dtype(torch.float32)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))   # strided rows
    positions = torch.randint(0, 64, (t,), generator=g)
    slots = torch.randperm(8 * 8, generator=g)[:t]
    slots[1] = -1
    caches = [torch.zeros(8, 8, hkv, d, dtype=dtype) for _ in range(2)]
    q_rot, k_rot = ops.rope_write_kv(q, k, v, positions, rotary.cos_sin_cache, caches[0], caches[1], slots)

    cs = rotary.cos_sin_cache.double()[positions]            # [t, 2, D]: [cos, cos], [-sin, sin]
    cos, sin = cs[:, 0:1, : d // 2].repeat(1, 1, 2), cs[:, 1:2, d // 2:].repeat(1, 1, 2)

    def rotate_half(x):
        return torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(q_rot.double(), q.double() * cos + rotate_half(q.double()) * sin, **tol)
    torch.testing.assert_close(k_rot.double(), k.double() * cos + rotate_half(k.double()) * sin, **tol)
    written = {int(s): i for i, s in enumerate(slots) if s >= 0}
    for s, i in written.items():
        assert torch.equal(caches[0].view(-1, hkv, d)[s], k_rot[i])
        assert torch.equal(caches[1].view(-1, hkv, d)[s], v[i])
    assert int((caches[0].view(-1, hkv, d).abs().sum((1, 2)) > 0).sum()) == len(written)   # nothing else
