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

from aphrodite.kernels import gguf_gpu, gguf_matmul
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


def q8_activations_f32(x: torch.Tensor) -> torch.Tensor:
    """``q8_activations`` in the kernels' float32 steps (code = rint(x * (1 / d)), d = max|x| / 127), so
    values that land on a tie between two codes (common with bfloat16 inputs) round as they do."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    return (torch.round(blocks * inv).double() * d.double()).reshape(x.shape)


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


needs_gemm = pytest.mark.skipif(not gguf_ops.gemm_available(), reason="no AVX-512 VNNI build")


@needs_gemm
@pytest.mark.parametrize("name", sorted(gguf_ops.GEMM_TYPES_BY_NAME))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(37, 100, 96), (64, 48, 576)])
@pytest.mark.parametrize("exact", [False, True])
def test_c_gemm_matches_float64(name, dtype, rows, n, k, exact):
    """The blocked GEMMs (8-bit activations from 3 rows; float32 activations from 8) against the gguf
    library's dequantized weight times the same activations (8-bit rounded, or not) in float64, with
    bias, into a column slice (its row stride): panels of 48 columns with a ragged last one (100 = 2 x
    48 + 4), tiles of 4 rows with one left (37), K of an odd number of 32-value blocks (96), and
    activations with outlier channels."""
    raw = random_blocks(name, n, k, seed=rows + n)
    w = reference(raw, name)
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, k, generator=g) * (1 + 20 * (torch.rand(k, generator=g) < 0.05))).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    wide = torch.full((rows, n + 7), 7.0, dtype=dtype)
    out = gguf_ops.linear(torch.from_numpy(raw), TYPES[name], x, bias, out=wide[:, 3:3 + n], exact=exact)
    assert (wide[:, :3] == 7).all() and (wide[:, 3 + n:] == 7).all()
    ref = (x.double() if exact else q8_activations_f32(x)) @ w.T + bias.double()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=8e-3, atol=1e-5 * ref.abs().max().item())
        # CPUs with VNNI but not AVX512-BF16 (Ice Lake) round the output in integer steps: same bits
        no_bf16 = load_library(("-mno-avx512bf16",))
        assert torch.equal(gguf_ops.linear(torch.from_numpy(raw), TYPES[name], x, bias, exact=exact, lib=no_bf16),
                           out)


@needs_gemm
def test_cpu_batch_path_bf16_takes_the_q8_gemm(monkeypatch):
    """bfloat16 rows above the GEMV's take the 8-bit GEMM by default (Q4_0/Q4_1/Q8_0; a K-quant keeps
    dequantize + BLAS); APHRODITE_GGUF_Q8_ACTIVATIONS=0 keeps float products; float32 stays exact (the
    float32 GEMM for those types)."""
    from aphrodite.modeling.layers.quantization import gguf as gguf_method
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the C path, not the interpreted Triton kernels
    rows = gguf_method.CPU_GEMV_MAX_ROWS + 5
    g = torch.Generator().manual_seed(9)
    monkeypatch.setattr(gguf_method, "CPU_Q8_ACTIVATIONS", False)
    for name in ("Q4_1", "Q8_0", "Q4_K"):
        raw = random_blocks(name, 40, 256, seed=4)
        seg = gguf_method.Segment(0, 40, TYPES[name], torch.from_numpy(raw))
        w = reference(raw, name)
        x = torch.randn(rows, 256, generator=g)
        q8 = gguf_ops.linear(seg.data, seg.qtype, x.bfloat16(), exact=False)
        monkeypatch.setattr(gguf_method, "CPU_Q8_BATCH_BF16", True)
        got = gguf_method._matmul(seg, x.bfloat16())
        assert torch.equal(got, q8) == (name != "Q4_K")
        monkeypatch.setattr(gguf_method, "CPU_Q8_BATCH_BF16", False)
        exact = (x.bfloat16().double() @ w.to(torch.bfloat16).double().T).to(torch.bfloat16)
        torch.testing.assert_close(gguf_method._matmul(seg, x.bfloat16()), exact, rtol=8e-3, atol=1e-3)
        monkeypatch.setattr(gguf_method, "CPU_Q8_BATCH_BF16", True)
        ref = x.double() @ w.T
        got = gguf_method._matmul(seg, x)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert torch.equal(got, gguf_ops.linear(seg.data, seg.qtype, x)) == (name != "Q4_K")


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


# The K-quant kernels of gguf_gpu (Q4_K, Q5_K, Q6_K), each path called directly.
KQ = ["Q4_K", "Q5_K", "Q6_K"]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item()


def _kquant_case(name: str, rows: int, n: int = 24, k: int = 1024, seed: int = 0):
    raw = random_blocks(name, n, k, seed=seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(raw), reference(raw, name), x


@pytest.mark.parametrize("name", KQ)
def test_kquant_gemv_exact_into_column_slice(name, device):
    w, ref_w, x = _kquant_case(name, 1, seed=3)
    wide = torch.full((1, 40), 7.0, device=device)
    # rows per program that do not divide N, several blocks per step
    gguf_gpu.gemv(x.to(device), w.to(device), TYPES[name], wide[:, 5:29], config=(16, 2, 4))
    assert (wide[:, :5] == 7).all() and (wide[:, 29:] == 7).all()
    assert _rel_err(wide[:, 5:29], x.double() @ ref_w.T) < 1e-6


@pytest.mark.parametrize("name", KQ)
def test_kquant_gemv_q8_matches_rounded_activations(name, device):
    """8-bit activations: equal to the product with the rounded activations (the min terms of Q4_K
    use the exact activation sums, so within their rounding), and close to the exact product."""
    w, ref_w, x = _kquant_case(name, 1, seed=4)
    assert gguf_gpu.q8_supported(TYPES[name], x.shape[1])
    out = torch.empty(1, 24, device=device)
    gguf_gpu.gemv_q8(x.to(device), w.to(device), TYPES[name], out, config=(4, 2, 4))
    exact = x.double() @ ref_w.T
    rounded = q8_activations(x) @ ref_w.T
    scale = exact.abs().max()
    got = out.cpu().double()
    assert (got - rounded).abs().max() / scale < (1e-5 if name == "Q6_K" else 2e-3)
    assert (got - exact).abs().max() / scale < 3e-2
    # the activation codes are llama.cpp's q8_1 rounding of x
    q, d, sums = gguf_gpu.quantize_activations(x.to(device))
    torch.testing.assert_close((q.cpu().double().view(1, -1, 32) * d.cpu().double()[..., None]).view(1, -1),
                               q8_activations(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(sums.cpu().double(), x.double().view(1, -1, 32).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KQ)
@pytest.mark.parametrize("impl", ["v1", "v2"])
def test_kquant_gemv_q8_steps_and_ragged_rows(name, impl, device, monkeypatch):
    """Both 8-bit GEMVs over several steps of several blocks (pairs of Q6_K blocks), rows per program
    not dividing N, written into a column slice: the product with the rounded activations."""
    monkeypatch.setattr(gguf_gpu, "GEMV_Q8_IMPL", impl)
    w, ref_w, x = _kquant_case(name, 1, n=26, k=2048, seed=8)
    wide = torch.full((1, 30), 7.0, device=device)
    gguf_gpu.gemv_q8(x.to(device), w.to(device), TYPES[name], wide[:, 2:28], config=(4, 4, 4))
    assert (wide[:, :2] == 7).all() and (wide[:, 28:] == 7).all()
    rounded = q8_activations(x) @ ref_w.T
    got = wide[:, 2:28].cpu().double()
    assert (got - rounded).abs().max() / rounded.abs().max() < (1e-5 if name == "Q6_K" else 2e-3)


@pytest.mark.parametrize("name", KQ)
def test_kquant_gemv_q8_few_rows(name, device):
    """2..16 activation rows through the 8-bit kernels (one read of the weight for all of them): each
    row equals its product with the rounded activations, into a column slice of a wider output."""
    w, ref_w, x = _kquant_case(name, 3, n=20, k=1024, seed=12)
    wide = torch.full((3, 24), 7.0, device=device)
    gguf_gpu.gemv_q8(x.to(device), w.to(device), TYPES[name], wide[:, 1:21], config=(4, 2, 4))
    assert (wide[:, :1] == 7).all() and (wide[:, 21:] == 7).all()
    rounded = q8_activations(x) @ ref_w.T
    got = wide[:, 1:21].cpu().double()
    assert (got - rounded).abs().max() / rounded.abs().max() < (1e-5 if name == "Q6_K" else 2e-3)


def test_kquant_q6k_odd_block_count_not_q8():
    """Q6_K rows of an odd number of blocks are not whole int32 words: the exact kernel takes them."""
    assert not gguf_gpu.q8_supported(TYPES["Q6_K"], 768)
    assert gguf_gpu.q8_supported(TYPES["Q6_K"], 512) and gguf_gpu.q8_supported(TYPES["Q4_K"], 768)


@pytest.mark.parametrize("name", KQ)
@pytest.mark.parametrize("rows", [2, 16])
def test_kquant_dot_one_pass(name, rows, device):
    w, ref_w, x = _kquant_case(name, rows, n=40, seed=rows)
    out = torch.empty(rows, 40, device=device)
    gguf_gpu.dot(x.to(device), w.to(device), TYPES[name], out)
    assert _rel_err(out, x.double() @ ref_w.T) < 1e-6


@pytest.mark.parametrize("name", KQ)
def test_kquant_dot_split_k_atomics(name, device):
    w, ref_w, x = _kquant_case(name, 5, n=40, seed=9)
    out = torch.empty(5, 40, device=device)
    gguf_gpu.dot(x.to(device), w.to(device), TYPES[name], out, split=3)
    assert _rel_err(out, x.double() @ ref_w.T) < 1e-6


@pytest.mark.parametrize("name", KQ)
def test_kquant_dequantize_bands(name, device, monkeypatch):
    """Many rows: the weight is dequantized a band of rows at a time (scratch smaller than the layer)."""
    w, ref_w, x = _kquant_case(name, 20, n=40, k=512, seed=11)
    torch.testing.assert_close(gguf_gpu.dequantize(w.to(device), TYPES[name], 512, torch.float32).cpu().double(),
                               ref_w, rtol=0, atol=0)
    monkeypatch.setattr(gguf_gpu, "SCRATCH_VALUES", 512 * 16)   # bands of 256 rows minimum -> force below
    monkeypatch.setattr(gguf_gpu, "MIN_BAND", 16)
    wide = torch.full((20, 50), 7.0, device=device)
    gguf_gpu.dequant_matmul(x.to(device), w.to(device), TYPES[name], wide[:, 3:43])
    assert (wide[:, :3] == 7).all() and (wide[:, 43:] == 7).all()
    assert _rel_err(wide[:, 3:43], x.double() @ ref_w.T) < 1e-6


@pytest.mark.parametrize("name", KQ)
def test_kquant_tiled_many_rows(name, device, monkeypatch):
    """Many rows through decoded tiles into tl.dot: several row tiles of activations and of weights."""
    monkeypatch.setattr(gguf_gpu, "TILED_BLOCK_M", 16)
    monkeypatch.setattr(gguf_gpu, "TILED_BLOCK_N", 16)
    w, ref_w, x = _kquant_case(name, 20, n=40, k=512, seed=13)
    out = gguf_gpu.tiled_matmul(x.to(device), w.to(device), TYPES[name], None)
    assert _rel_err(out, x.double() @ ref_w.T) < 1e-6


@pytest.mark.parametrize("rows", [1, 3])
def test_kquant_q8_activations_shared_across_segments(rows, device):
    """A fused layer rounds its activations once; each segment's GEMV then gives what it gives
    rounding them itself (bf16 activations take the 8-bit path by default up to Q8_MAX_ROWS rows)."""
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=torch.bfloat16)
    xq = gguf_matmul.q8_activations(x)
    assert xq is not None and gguf_matmul.q8_activations(x.float()) is None
    too_many = torch.zeros(gguf_gpu.Q8_MAX_ROWS + 1, 512, device=device, dtype=torch.bfloat16)
    assert gguf_matmul.q8_activations(too_many) is None
    for name in KQ:
        w = torch.from_numpy(random_blocks(name, 8, 512, seed=6)).to(device)
        torch.testing.assert_close(gguf_matmul.gguf_linear(x, w, TYPES[name], xq=xq),
                                   gguf_matmul.gguf_linear(x, w, TYPES[name]), rtol=0, atol=0)


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


def test_cpu_batch_path_row_tiles(monkeypatch):
    """A weight above ``CPU_DEQUANT_TILE`` values goes in row tiles (the LM head): every tile, the ragged
    last one included, lands in its columns, with its part of the bias, also into a column slice."""
    from aphrodite.modeling.layers.quantization import gguf as gguf_method
    monkeypatch.setattr(gguf_method, "CPU_DEQUANT_TILE", 256 * 10)
    rows = gguf_method.CPU_GEMV_MAX_ROWS + 3
    g = torch.Generator().manual_seed(3)
    for name in ("Q8_0", "Q4_K"):
        raw = random_blocks(name, 37, 256, seed=11)
        seg = gguf_method.Segment(0, 37, TYPES[name], torch.from_numpy(raw))
        x, bias = torch.randn(rows, 256, generator=g), torch.randn(37, generator=g)
        ref = x.double() @ reference(raw, name).T + bias.double()
        wide = torch.zeros(rows, 40)
        got = gguf_method._matmul(seg, x, bias, out=wide[:, 2:39])
        for out in (got, wide[:, 2:39]):
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert (wide[:, :2] == 0).all() and (wide[:, 39:] == 0).all()
