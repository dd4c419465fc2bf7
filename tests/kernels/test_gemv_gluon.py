"""The version-2 int4 Gluon GEMV (``gemv_gluon._gemv_w4v2_kernel``) has no CPU interpreter: here it is compiled
for sm_90 (Triton's bundled ptxas) and its machine code checked for what it exists for (16-byte cp.async copies,
no register spills, shared memory within an H200's); its numbers are checked on the GPU by
``benchmarks/gpu/check_w4_gemv.py`` against float64 dequantize + matmul. On the CPU (and on GPUs other than
sm_90) a Gluon shape is never launched: ``quant_gemv`` runs the Triton GEMV instead, checked here."""
from __future__ import annotations

import re

import pytest
import torch

from aphrodite.kernels.int4_matmul import FMT_INT4, INT4_ORDER, repack_int4, unpack_int4_cols
from aphrodite.kernels.quant_gemv import GemvConfig, gluon_gemv_candidates, gluon_gemv_ok, quant_gemv
from aphrodite.kernels.w4_wgmma import HAS_GLUON
from tests.sass import cuobjdump, sass_and_usage

V2 = [c for c in gluon_gemv_candidates(FMT_INT4) if c.tk]
RING = GemvConfig(block_k=2, vec=2, tk=4, warps=4, stages=8, gluon=True)               # the cp.async-ring form
CAPPED = GemvConfig(block_k=2, vec=2, tk=4, warps=4, stages=3, gluon=True, ring=False, maxnreg=64)



def _compile_v2(cfg: GemvConfig, rows: int, split: bool, zp: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from aphrodite.kernels.gemv_gluon import _gemv_w4v2_kernel
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "bias_ptr": "*bf16",
            "out_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    ints = ["M", "N", "groups_per_split", "num_groups", "num_splits", "one", "stride_xm", "stride_wk", "stride_sg",
            "stride_om"]
    const = dict(ROWS=rows, GROUP=128, HAS_ZP=zp, HAS_BIAS=not split, R=cfg.block_k, V=cfg.vec, TK=cfg.tk,
                 WK=cfg.wk, STAGES=cfg.stages, RING=cfg.ring, SPLIT=split, num_warps=cfg.warps)
    sig = {**ptrs, **dict.fromkeys(ints, "i32"), **dict.fromkeys(const, "constexpr")}
    aligned = set(ptrs) | {"N", "one", "stride_xm", "stride_wk", "stride_sg", "stride_om"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name in aligned}
    options = dict(num_warps=cfg.warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return triton.compile(GluonASTSource(_gemv_w4v2_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 128),
                          options=options)


@pytest.mark.skipif(not HAS_GLUON or cuobjdump() is None, reason="Triton without Gluon or cuobjdump")
@pytest.mark.parametrize("rows,split,zp,cfg",
                         [(1, True, True, V2[0]), (2, False, False, V2[0]), (1, True, True, RING),
                          (1, True, True, CAPPED)],
                         ids=["cand-split", "cand-2rows", "ring", "capped"])
def test_int4_gemv_v2_compiles_without_spills(rows: int, split: bool, zp: bool, cfg: GemvConfig):
    """The register-prefetch form (the candidates), the cp.async ring (8-byte copies) and the register-prefetch
    form capped at 64 registers a thread (8 programs of 4 warps an SM): no local memory in any."""
    ring = cfg.ring
    kernel = _compile_v2(cfg, rows, split, zp)
    sass, usage = sass_and_usage(kernel)
    if ring:
        assert {4: "LDGSTS.E.BYPASS.128", 2: "LDGSTS.E.64", 1: "LDGSTS.E "}[cfg.vec] in sass
    else:
        assert "LDGSTS" not in sass                         # plain loads into registers, no shared memory ring
        assert int(re.search(r"REG:(\d+)", usage).group(1)) <= (cfg.maxnreg or 255)
    assert re.search(r"LOCAL:0\b", usage), usage
    assert kernel.metadata.shared <= 227 * 1024
    # the per-nibble work is one mask-or (LOP3) and one FMA: a kernel without them is not this kernel
    assert sass.count("FFMA") >= 8 * cfg.block_k * cfg.vec and "LOP3" in sass


def test_gemv_w4v2_supported_shapes():
    """Whole column blocks (vec * 32 / tk * warps / wk words) and steps (r * tk * wk rows) that tile a group."""
    from aphrodite.kernels.gemv_gluon import gemv_w4v2_supported
    assert gemv_w4v2_supported(4096, 4096, 128, 2, 2, 4, 4, 1)            # 64 words = 512 outputs, 8-row steps
    assert not gemv_w4v2_supported(4096 + 256, 4096, 128, 2, 2, 4, 4, 1)  # a partial column block
    assert not gemv_w4v2_supported(4096, 4096, 128, 8, 2, 32, 4, 1)       # 256-row steps straddle groups
    assert not gemv_w4v2_supported(4096, 4096, 128, 2, 3, 4, 4, 1)        # 12-byte copies
    assert not gemv_w4v2_supported(4096, 4096, 128, 2, 2, 4, 4, 3)        # warps not split evenly


@pytest.mark.parametrize("cfg", V2[:2], ids=lambda c: f"r{c.block_k}v{c.vec}tk{c.tk}")
def test_gluon_shapes_take_the_triton_gemv_off_sm90(monkeypatch, cfg: GemvConfig):
    """On the CPU a Gluon config is refused by ``gluon_gemv_ok`` and ``quant_gemv`` computes the same product
    with the Triton GEMV (interpreted): float64 dequantize + matmul is the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k, n, group = 256, 512, 128
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, generator=gen)
    scales = torch.rand(k // group, n, generator=gen) * 0.01 + 0.001
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).float()
    w = repack_int4(codes, scales, zeros, group)
    x = torch.randn(1, k, generator=gen)
    assert not gluon_gemv_ok(x, w, cfg)
    q = unpack_int4_cols(w.weight, INT4_ORDER).double()
    rows = torch.arange(k) // group
    ref = x.double() @ ((q - zeros.double()[rows]) * scales.double()[rows])
    got = quant_gemv(x, w, config=cfg)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_gluon_defaults_are_gpu_checked_candidates():
    """Every Gluon shape the engine runs by default is one that ``benchmarks/gpu/check_w4_gemv.py`` (int4) or
    ``bench_w4_wgmma.py --gemv`` (FP8) checks on the GPU: a candidate of its format."""
    from aphrodite.kernels.quant_gemv import _GLUON_DEFAULT, _GLUON_DEFAULT_LONG_K, _LONG_K, _gluon_default
    for table in (_GLUON_DEFAULT, _GLUON_DEFAULT_LONG_K):
        for (fmt, rows), cfg in table.items():
            assert 1 <= rows <= 4 and cfg in gluon_gemv_candidates(fmt), (fmt, rows, cfg)
    # a long K (down_proj) at one row takes the four-warp-row shape; at 2 rows the Triton GEMV (None)
    assert _gluon_default(FMT_INT4, 1, 4 * _LONG_K).wk == 4 and _gluon_default(FMT_INT4, 1, 4096).wk == 1
    assert _gluon_default(FMT_INT4, 2, 4 * _LONG_K) is None and _gluon_default(FMT_INT4, 3, 4096) is None
