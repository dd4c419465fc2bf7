"""The fused dequantizing GEMM (Triton, interpreted on the CPU) and the FP8 activation quantizer vs
float64 recomputations, through every launch shape: one row (FMA path), several rows (tl.dot), split-K
with the in-kernel reduction, act-order permutations, uneven groups, and dequantize + matmul."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from aphrodite.kernels.fp8_quant import W8A8Config, per_token_quant_fp8, scaled_mm_fp8
from aphrodite.kernels.int4_matmul import FMT_FP8, Config, QuantWeight, quant_matmul, repack_int4, w4_supported
from tests.quantization import packing


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _int4_case(k: int, n: int, group: int, asym: bool, g_idx: torch.Tensor | None):
    gen = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=gen)
    gi = torch.arange(k) // group if g_idx is None else g_idx
    codes, scales, zeros = packing.quantize_groups(w, group, not asym, gi)
    ref = packing.dequant(codes, scales, zeros, gi)                        # [N, K] float64
    qw = repack_int4(codes.t().contiguous().to(torch.uint8), scales.t().float().contiguous(),
                     zeros.t().float().contiguous() if asym else None, group, g_idx)
    return qw, ref


CONFIGS = [Config(1, 16, 32, splits=1), Config(1, 32, 16, splits=3), Config(16, 16, 32, splits=1),
           Config(16, 32, 16, splits=2), Config(16, 16, 32, splits=2, swap=True), Config(dequant=True)]


def _cfg_id(c: Config) -> str:
    return f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.splits}d{int(c.dequant)}w{int(c.swap)}a{c.ahead}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("layout", ["sym", "asym", "actorder", "uneven"])
def test_int4_matmul(cfg, layout):
    k, n, group = 128, 48, 32
    g_idx = None
    if layout == "actorder":
        g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(3)) // group
    elif layout == "uneven":   # a tensor-parallel shard of an act-order layer: groups of any size
        g_idx = torch.randint(0, 6, (k,), generator=torch.Generator().manual_seed(4))
    qw, ref = _int4_case(k, n, group, layout != "sym", g_idx)
    assert (qw.g_idx is not None) == (layout == "uneven")
    assert (qw.perm is not None) == (layout in ("actorder", "uneven"))
    rows = 1 if cfg.block_m == 1 and not cfg.dequant else 5
    x = torch.randn(rows, k)
    bias = torch.randn(n)
    got = quant_matmul(x, qw, bias, config=cfg).double()
    want = x.double() @ ref.t() + bias.double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


W4_CONFIGS = [Config(16, 32, 32, splits=1, w4=True), Config(16, 16, 16, splits=3, swap=True, w4=True),
              Config(16, 16, 16, splits=3, w4=True, ahead=2), Config(32, 64, 32, splits=2, w4=True, ahead=2),
              Config(32, 32, 16, target=1, swap=True, w4=True)]


@pytest.mark.parametrize("cfg", W4_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_w4_gemm(cfg, dtype, asym):
    """The batched W4A16 kernel (exponent-bits dequantization, split-K, swapped operands, rows that do not
    fill a tile) vs the float64 dequantized weight rounded to the activation dtype as the kernel rounds it:
    only the output rounding and fp32 accumulation may differ."""
    k, n, group = 128, 64, 32 if cfg.block_k == 32 else 64
    gen = torch.Generator().manual_seed(7)
    codes, scales, zeros = packing.quantize_groups(torch.randn(n, k, generator=gen), group, not asym)
    scales = scales.to(dtype).double()
    gi = torch.arange(k) // group
    ref = packing.dequant(codes, scales, zeros, gi).to(dtype).double()     # [N, K]
    qw = repack_int4(codes.t().contiguous().to(torch.uint8), scales.t().to(dtype).contiguous(),
                     zeros.t().to(dtype).contiguous() if asym else None, group)
    rows = 5 if cfg.block_m == 16 else 40
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    assert w4_supported(x, qw, cfg)
    got = quant_matmul(x, qw, bias, config=cfg).double()
    want = x.double() @ ref.t() + bias.double()
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    torch.testing.assert_close(got, want, rtol=ulp, atol=1e-5 * want.abs().max().item())


def test_w4_gemm_dispatch(monkeypatch):
    """Dispatch is a fixed table (no tuner unless asked for): the W4A16 shape of the rows bucket where that kernel
    applies, the general kernel's first shape elsewhere (fp32 activations, fp32 scales, N a multiple of no
    W4A16 tile, uneven act-order groups, ``APHRODITE_W4A16=0``). Act-order weights run the W4A16 kernel after
    one gather of x's columns. The opt-in tuner is offered both kernels' shapes."""
    from aphrodite.kernels.int4_matmul import _candidates, _candidates_for, _default_config, _tuning_enabled
    assert not _tuning_enabled()

    def half(q: QuantWeight) -> QuantWeight:     # the layers keep scales and zeros in the activation dtype
        return dataclasses.replace(q, scales=q.scales.half(), zeros=q.zeros.half())

    qw64, _ = _int4_case(64, 64, 32, True, None)
    xh = torch.randn(20, 64).half()
    assert not w4_supported(xh, qw64) and not _default_config(20, xh, qw64).w4        # fp32 scales
    assert _candidates_for(20, xh, qw64) == _candidates(20)
    qw64 = half(qw64)
    assert _default_config(20, xh, qw64).w4 and _default_config(5, xh[:5], qw64).w4
    assert not _default_config(20, xh.float(), qw64).w4
    cands = _candidates_for(20, xh, qw64)
    assert cands[:len(_candidates(20))] == _candidates(20) and any(c.w4 for c in cands)
    monkeypatch.setenv("APHRODITE_W4A16", "0")
    assert _candidates_for(20, xh, qw64) == _candidates(20) and not _default_config(20, xh, qw64).w4
    monkeypatch.delenv("APHRODITE_W4A16")
    k, n, group = 64, 72, 32                                            # N a multiple of no W4A16 tile
    codes, scales, zeros = packing.quantize_groups(torch.randn(n, k), group, False)
    qn = repack_int4(codes.t().contiguous().to(torch.uint8), scales.t().half().contiguous(),
                     zeros.t().half().contiguous(), group)
    assert not _default_config(20, xh, qn).w4
    ref = packing.dequant(codes, scales, zeros, torch.arange(k) // group).half().double()
    torch.testing.assert_close(quant_matmul(xh, qn).double(), xh.double() @ ref.t(), rtol=2**-10, atol=1e-3)
    qa, ref_a = _int4_case(64, 64, 32, True, torch.randperm(64, generator=torch.Generator().manual_seed(1)) // 32)
    qa = half(qa)
    assert _default_config(20, xh, qa).w4
    want = xh.double() @ ref_a.t().half().double()
    torch.testing.assert_close(quant_matmul(xh, qa).double(), want, rtol=2**-10, atol=1e-3)
    qu, _ = _int4_case(64, 64, 32, True, torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2)))
    qu = half(qu)
    assert qu.g_idx is not None and not w4_supported(xh, qu) and not _default_config(20, xh, qu).w4


@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=_cfg_id)
@pytest.mark.parametrize("block", [None, (16, 32)], ids=["channel", "block"])
def test_fp8_weight_matmul(cfg, block):
    k, n = 96, 64
    w = torch.randn(n, k)
    if block is None:
        wq, scale = packing.quantize_fp8_channel(w)
        ref = wq.double() * scale.double()[:, None]
        qw = QuantWeight(FMT_FP8, wq, scale.reshape(1, n), k, n, k)
    else:
        bn, bk = block
        wq, scale = packing.quantize_fp8_block(w, bn, bk)
        ref = packing.dequant_fp8_block(wq, scale, bn, bk)
        qw = QuantWeight(FMT_FP8, wq, scale.t().contiguous(), k, n, bk, bn)
    x = torch.randn(1 if cfg.block_m == 1 else 4, k)
    got = quant_matmul(x, qw, config=cfg).double()
    want = x.double() @ ref.t()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("static", [False, True])
def test_per_token_quant_and_scaled_mm(static):
    x = torch.randn(5, 200) * torch.tensor([0.01, 1.0, 30.0, 100.0, 3.0])[:, None]
    s_in = torch.tensor([0.25]) if static else None
    q, s = per_token_quant_fp8(x, s_in)
    amax = x.double().abs().amax(1, keepdim=True)
    want_s = torch.full_like(amax, 0.25) if static else amax / 448.0
    torch.testing.assert_close(s.double(), want_s, rtol=1e-6, atol=0)
    # Round-trip error of e4m3 is at most half an ulp: 2^-4 relative for normal values.
    back = q.double() * s.double()
    clipped = x.double().clamp(-448 * want_s, 448 * want_s)
    assert bool(((back - clipped).abs() <= clipped.abs() * 2**-4 + want_s * 2**-9).all())
    w = torch.randn(24, 200)
    wq, ws = packing.quantize_fp8_channel(w)
    out = scaled_mm_fp8(q, s, wq, ws, torch.float32)
    want = back @ (wq.double() * ws.double()[:, None]).t()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_per_token_quant_long_rows():
    """Rows longer than the kernel's register block (16k) take the two-pass loop: same scales and codes as
    the float64 recomputation."""
    x = torch.randn(2, 16400) * torch.tensor([0.5, 40.0])[:, None]
    q, s = per_token_quant_fp8(x)
    want_s = x.double().abs().amax(1, keepdim=True) / 448.0
    torch.testing.assert_close(s.double(), want_s, rtol=1e-6, atol=0)
    want_q = (x.double() / want_s).float().to(torch.float8_e4m3fn)
    assert (q.float() != want_q.float()).float().mean().item() < 1e-3     # ties may round apart


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_w4_dequantize_then_matmul(dtype):
    """Many rows dequantize to a dense weight (the W4A16 dequantization, one tile per program) and multiply:
    the weight equals the float64 dequantization rounded to the activation dtype."""
    k, n, group = 128, 64, 64
    codes, scales, zeros = packing.quantize_groups(torch.randn(n, k), group, False)
    scales = scales.to(dtype).double()
    ref = packing.dequant(codes, scales, zeros, torch.arange(k) // group).to(dtype).double()
    qw = repack_int4(codes.t().contiguous().to(torch.uint8), scales.t().to(dtype).contiguous(),
                     zeros.t().to(dtype).contiguous(), group)
    x = torch.randn(6, k).to(dtype)
    assert w4_supported(x, qw)
    got = quant_matmul(x, qw, config=Config(dequant=True)).double()
    want = x.double() @ ref.t()
    ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    torch.testing.assert_close(got, want, rtol=ulp, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("cfg", [W8A8Config(16, 32, 128, target=1), W8A8Config(16, 16, 64, target=8)],
                         ids=["nosplit", "split"])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_kernel(cfg, bias):
    """The Triton W8A8 kernel (fp8 MMA, scales in the epilogue, split-K, rows/columns past a tile) vs the
    float64 product of the dequantized operands."""
    x = torch.randn(5, 128) * torch.tensor([0.1, 1.0, 8.0, 30.0, 2.0])[:, None]
    q, s = per_token_quant_fp8(x)
    w = torch.randn(40, 128)
    wq, ws = packing.quantize_fp8_channel(w)
    b = torch.randn(40) if bias else None
    got = scaled_mm_fp8(q, s, wq, ws, torch.float32, b, config=cfg).double()
    want = (q.double() * s.double()) @ (wq.double() * ws.double()[:, None]).t()
    if bias:
        want = want + b.double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
