"""The decode GEMV (Triton, interpreted on the CPU) vs float64 dequantize-then-matmul recomputations:
int4 symmetric and asymmetric, groups of 32 and 128, 1..4 rows, bias, split-K with the in-kernel
reduction, N not a multiple of the tile; FP8 with per-channel scales; what falls back to the old kernel."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from aphrodite.kernels.int4_matmul import FMT_FP8, INT4_ORDER, QuantWeight, repack_int4, unpack_int4_cols
from aphrodite.kernels.quant_gemv import GemvConfig, gemv_enabled, quant_gemv, supports
from tests.quantization import packing


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _int4_case(k: int, n: int, group: int, asym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + k + n)
    w = torch.randn(n, k, generator=gen)
    gi = torch.arange(k) // group
    codes, scales, zeros = packing.quantize_groups(w, group, not asym, gi)
    ref = packing.dequant(codes, scales, zeros, gi)                        # [N, K] float64
    qw = repack_int4(codes.t().contiguous().to(torch.uint8), scales.t().float().contiguous(),
                     zeros.t().float().contiguous() if asym else None, group)
    return qw, ref


def _check(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("rows,defer", [(1, False), (1, True), (2, False), (2, True), (3, False), (4, False)],
                         ids=lambda v: str(v) if isinstance(v, int) else ("group-scale" if v else "element-scale"))
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("group,cfg", [(32, GemvConfig(block=4, block_k=16, splits=3)),
                                       (128, GemvConfig(block=8, block_k=32, splits=1))],
                         ids=["g32-split3", "g128-nosplit"])
def test_int4_gemv(rows, defer, asym, group, cfg):
    """Both int4 paths (the per-group one runs for 1..2 rows; more rows always take the other)."""
    cfg = dataclasses.replace(cfg, defer=defer)
    k, n = 3 * group, 72                    # 9 words: the last program is partial (masked)
    qw, ref = _int4_case(k, n, group, asym, rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(n)
    got = quant_gemv(x, qw, bias, config=cfg)
    assert got.shape == (rows, n) and got.dtype == x.dtype
    _check(got, x.double() @ ref.t() + bias.double())


def test_int4_gemv_bf16_even_tiles():
    """bf16 activations, N a multiple of the tile (unmasked loads), 4-row tiles, uneven split of groups."""
    k, n, group = 5 * 32, 128, 32
    qw, _ = _int4_case(k, n, group, True)
    qw.scales = qw.scales.to(torch.bfloat16)
    qw.zeros = qw.zeros.to(torch.bfloat16)
    codes = unpack_int4_cols(qw.weight, INT4_ORDER).double()               # the reference with bf16 scales
    rows = torch.arange(k) // group
    wd = (codes - qw.zeros.double()[rows]) * qw.scales.double()[rows]
    x = torch.randn(2, k).to(torch.bfloat16)
    got = quant_gemv(x, qw, config=GemvConfig(block=16, block_k=4, warps=1, splits=2))
    _check(got, x.double() @ wd, tol=8e-3)   # bf16 output rounding


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("cfg", [GemvConfig(block=16, block_k=32, splits=1), GemvConfig(block=8, block_k=32, splits=2),
                                 GemvConfig(block=16, block_k=64, splits=2)], ids=["even", "split2", "ragged-k"])
def test_fp8_gemv(rows, cfg):
    k, n = 96, 40
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(rows))
    wq, scale = packing.quantize_fp8_channel(w)
    ref = wq.double() * scale.double()[:, None]
    qw = QuantWeight(FMT_FP8, wq, scale.reshape(1, n), k, n, k)
    x = torch.randn(rows, k)
    bias = torch.randn(n)
    _check(quant_gemv(x, qw, bias if rows != 2 else None, config=cfg),
           x.double() @ ref.t() + (bias.double() if rows != 2 else 0))


@pytest.mark.parametrize("rows", [1, 3])
def test_fp8_block_scales_gemv(rows):
    """Block-wise scales (128x128 in Qwen3-FP8; 16x32 here): a tile never straddles a scale block."""
    k, n, bn, bk = 96, 48, 16, 32
    wq, scale = packing.quantize_fp8_block(torch.randn(n, k), bn, bk)
    ref = packing.dequant_fp8_block(wq, scale, bn, bk)
    qw = QuantWeight(FMT_FP8, wq, scale.t().contiguous(), k, n, bk, bn)
    assert supports(torch.randn(rows, k), qw)
    x = torch.randn(rows, k)
    bias = torch.randn(n)
    got = quant_gemv(x, qw, bias, config=GemvConfig(block=32, block_k=64, splits=2))   # clamped to 16 x 32
    _check(got, x.double() @ ref.t() + bias.double())


def test_fallbacks_and_env(monkeypatch):
    k, n, group = 64, 16, 32
    qw, _ = _int4_case(k, n, group, False)
    x = torch.randn(1, k)
    assert supports(x, qw) and not supports(torch.randn(5, k), qw)
    act = repack_int4(torch.randint(0, 16, (k, n), dtype=torch.uint8), qw.scales, None, group,
                      torch.randperm(k) // group)
    assert act.perm is not None and not supports(x, act)          # act-order: the general kernel
    wq, scale = packing.quantize_fp8_block(torch.randn(n, k), 4, 32)          # 4-row scale blocks: too thin
    assert not supports(x, QuantWeight(FMT_FP8, wq, scale.t().contiguous(), k, n, 32, 4))
    with pytest.raises(ValueError, match="does not support"):
        quant_gemv(torch.randn(5, k), qw)
    monkeypatch.setenv("APHRODITE_QUANT_GEMV", "old")
    assert not gemv_enabled()
    monkeypatch.setenv("APHRODITE_QUANT_GEMV", "fast")
    with pytest.raises(ValueError, match="APHRODITE_QUANT_GEMV"):
        gemv_enabled()
