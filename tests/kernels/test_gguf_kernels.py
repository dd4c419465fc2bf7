"""GGUF block kernels against the ``gguf`` package's dequantization (the independent reference).

Every block type gets random valid blocks (random codes and scale bytes, finite half-precision
scales). The PyTorch reference and the C dequantization must reproduce ``gguf.quants.dequantize``;
the C GEMV (native and portable builds) and the Triton kernels (interpreted here) must match
``x @ dequantize(W)^T`` in float64: the C path within the bound its 8-bit activations allow, and
tightly against the same product with those 8-bit activations.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aphrodite.kernels import gguf_matmul
from aphrodite.kernels.cpu import gguf_ops
from aphrodite.kernels.cpu.build import load_library

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

TYPES = {name: int(getattr(gguf.GGMLQuantizationType, name))
         for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
# Byte offsets of each block's half-precision scales.
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """``uint8 [rows, row_bytes]``: random codes, scales drawn from a sane range."""
    qk, bb = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // qk, bb), dtype=np.uint8)
    for off in HALF_FIELDS[name]:
        halves = (rng.standard_normal((rows, k // qk)) * 0.02).astype(np.float16)
        raw[:, :, off:off + 2] = halves.view(np.uint8).reshape(rows, k // qk, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float64))


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as the C kernels quantize it: 8-bit codes per 32 values, scale max|x|/127."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).float().double()
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("name", TYPES)
def test_reference_dequantize_matches_gguf(name):
    k = 512
    raw = random_blocks(name, 6, k, seed=1)
    ref = reference(raw, name)
    ours = gguf_matmul.dequantize_reference(torch.from_numpy(raw), TYPES[name], k)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)


needs_c = pytest.mark.skipif(not gguf_ops.available(torch.float32), reason="no C compiler for the CPU kernels")


@needs_c
@pytest.mark.parametrize("name", TYPES)
def test_c_dequantize_matches_gguf(name):
    k = 512
    raw = random_blocks(name, 5, k, seed=2)
    ref = reference(raw, name)
    w = torch.from_numpy(raw)
    torch.testing.assert_close(gguf_ops.dequantize(w, TYPES[name], k).double(), ref, rtol=1e-6, atol=1e-7)
    rows = torch.tensor([4, 0, 4, 2])
    torch.testing.assert_close(gguf_ops.dequantize(w, TYPES[name], k, torch.bfloat16, rows=rows).double(),
                               ref[rows].to(torch.bfloat16).double())


@pytest.fixture(params=["native", "portable-code", "no-avx512"])
def c_build(request):
    """(library, force the portable loops): this CPU's build, its portable loops, and a build
    without AVX-512 (AVX2 without VNNI: the maddubs path)."""
    if request.param == "no-avx512":
        import platform
        if platform.machine() != "x86_64":
            pytest.skip("x86-64 only")
        return load_library(("-mno-avx512f",)), False
    return load_library(), request.param == "portable-code"


@needs_c
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_linear_exact_matches_float64(name, rows, dtype, c_build):
    lib, portable = c_build
    k, n = 512, 24
    raw = random_blocks(name, n, k, seed=rows + 100)
    w = reference(raw, name)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    out = gguf_ops.linear(torch.from_numpy(raw), TYPES[name], x, bias, exact=True, portable=portable, lib=lib)
    assert out.shape == (rows, n) and out.dtype == dtype
    ref = x.double() @ w.T + bias.double()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=8e-3, atol=1e-5 * ref.abs().max().item())


@needs_c
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_linear_q8_activations_match_float64(name, rows, dtype, c_build):
    lib, portable = c_build
    k, n = 512, 24
    raw = random_blocks(name, n, k, seed=rows)
    w = reference(raw, name)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    out = gguf_ops.linear(torch.from_numpy(raw), TYPES[name], x, bias, exact=False, portable=portable, lib=lib)
    assert out.shape == (rows, n) and out.dtype == dtype
    exact = x.double() @ w.T + bias.double()
    xq = q8_activations(x.float())
    # The 8-bit activations move each product by at most sum |w| * (block scale / 2).
    step = (x.double().reshape(rows, -1, 32).abs().amax(-1) / 127 / 2).repeat_interleave(32, dim=1)
    bound = step @ w.abs().T
    out_tol = exact.abs() * (4e-3 if dtype == torch.bfloat16 else 1e-5) + 1e-4
    assert ((out.double() - exact).abs() <= bound * 1.001 + out_tol).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), xq @ w.T + bias.double(), rtol=1e-4, atol=1e-4)


@needs_c
def test_c_linear_writes_into_column_slice():
    k = 256
    raw = torch.from_numpy(random_blocks("Q4_K", 8, k, seed=3))
    x = torch.randn(2, k)
    full = torch.full((2, 20), 7.0)
    gguf_ops.linear(raw, TYPES["Q4_K"], x, out=full[:, 5:13])
    assert (full[:, :5] == 7).all() and (full[:, 13:] == 7).all()
    torch.testing.assert_close(full[:, 5:13], gguf_ops.linear(raw, TYPES["Q4_K"], x))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_triton_linear_matches_float64(name, rows, device):
    k, n = 512, 40
    raw = random_blocks(name, n, k, seed=rows + 7)
    w = reference(raw, name)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    out = gguf_matmul.gguf_linear(x.to(device), torch.from_numpy(raw).to(device), TYPES[name])
    assert out.shape == (rows, n)
    torch.testing.assert_close(out.cpu().double(), x.double() @ w.T, rtol=1e-4, atol=1e-4)


@needs_c
def test_cpu_batch_path_reuses_its_scratch_correctly():
    """Above ``CPU_GEMV_MAX_ROWS`` rows a weight is dequantized into one reused buffer and multiplied
    by BLAS: consecutive layers of different shapes and types must not see each other's values."""
    from aphrodite.modeling.layers.quantization.gguf import CPU_GEMV_MAX_ROWS, Segment, _matmul
    rows = CPU_GEMV_MAX_ROWS + 8
    g = torch.Generator().manual_seed(7)
    cases = []
    for name, n, k in (("Q4_1", 48, 256), ("Q8_0", 96, 512), ("Q6_K", 16, 256)):
        raw = random_blocks(name, n, k, seed=n)
        cases.append((Segment(0, n, TYPES[name], torch.from_numpy(raw)), reference(raw, name),
                      torch.randn(rows, k, generator=g)))
    first = [_matmul(seg, x) for seg, _, x in cases]
    again = [_matmul(seg, x) for seg, _, x in cases]
    for (_, w, x), a, b in zip(cases, first, again, strict=True):
        ref = x.double() @ w.T
        torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert torch.equal(a, b)
