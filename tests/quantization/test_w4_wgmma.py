"""The Gluon W4A16 kernel (``aphrodite/kernels/w4_wgmma.py``) has no CPU interpreter, so on the CPU it is
compiled ahead of time for sm_90 (Triton's bundled ptxas) and its machine code is checked for what the kernel
exists for: the tensor-core MMAs stay asynchronous with one group left in flight across the loop (ptxas
serializes them when it cannot prove the accumulators untouched, which silently halves the speed), no
register spills, and shared memory within an H100/H200's 227 KB. Its numbers are checked on the GPU
(``benchmarks/gpu/bench_w4_wgmma.py``, ``bench_quant_gemm.py --check-only``) against dequantize + matmul."""
from __future__ import annotations

import re

import pytest

from aphrodite.kernels import int4_matmul as im
from aphrodite.kernels.w4_wgmma import HAS_GLUON
from tests.sass import cuobjdump, sass_and_usage

pytestmark = pytest.mark.skipif(not HAS_GLUON, reason="Triton without Gluon")



def _compile(cfg: im.Config, split: bool, zp: bool = True, dtype: str = "bf16"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from aphrodite.kernels.w4_wgmma import _w4_wgmma_kernel
    ptrs = {"x_ptr": f"*{dtype}", "w_ptr": "*i32", "s_ptr": f"*{dtype}", "z_ptr": f"*{dtype}",
            "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    ints = ["M", "N", "K", "tiles_per_split", "num_splits", "magic", "stride_xm", "stride_wk", "stride_sg",
            "stride_om"]
    const = dict(BASE=128.0 if dtype == "bf16" else 1024.0, GROUP=128, HAS_ZP=zp, HAS_BIAS=False,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.stages, SPLIT=split,
                 SWAP=cfg.swap, num_warps=cfg.warps)
    sig = {**ptrs, **dict.fromkeys(ints, "i32"), **dict.fromkeys(const, "constexpr")}
    aligned = set(ptrs) | {"N", "K", "stride_xm", "stride_wk", "stride_sg", "stride_om"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name in aligned}
    return triton.compile(GluonASTSource(_w4_wgmma_kernel, sig, const, attrs),
                          target=GPUTarget("cuda", 90, 128), options=dict(num_warps=cfg.warps))


def _shapes() -> list[tuple[im.Config, bool]]:
    """What the engine dispatches (the table's shapes; split-K where the bucket splits) and the largest
    candidate."""
    picks = {(cfg, bucket <= 64) for bucket, cell in im._WGMMA_TABLE.items() for cfg in cell if cfg is not None}
    picks.add((im._wgmma_candidates(1024)[0], False))
    return sorted(picks, key=str)


@pytest.mark.skipif(cuobjdump() is None, reason="no bundled cuobjdump")
@pytest.mark.parametrize("cfg,split", _shapes(), ids=lambda v: str(v) if isinstance(v, bool) else
                         f"m{v.block_m}n{v.block_n}k{v.block_k}s{v.stages}w{v.warps}" + ("S" if v.swap else ""))
def test_int4_wgmma_kernel_keeps_mma_in_flight(cfg: im.Config, split: bool):
    kernel = _compile(cfg, split)
    sass, usage = sass_and_usage(kernel)
    assert "HGMMA" in sass
    # One wait that leaves a group in flight (the loop's) and one full wait (after it); a serialized
    # pipeline shows a full wait after every MMA instead.
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x1") == 1
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 1
    assert re.search(r"LOCAL:0\b", usage), usage
    assert kernel.metadata.shared <= 227 * 1024


def _compile_ws(cfg: im.Config, split: bool, zp: bool = True, dtype: str = "bf16"):
    import torch
    import triton
    import triton.experimental.gluon.language as gl
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from aphrodite.kernels.w4_wgmma import _w4_ws_kernel, _w4_wsp_kernel
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    xl = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16 if dtype == "bf16" else gl.float16)
    wl = gl.NVMMASharedLayout.get_default_for([bk, bn // 8], gl.int32)
    sig = {"x_desc": f"tensordesc<{dtype}[{bm}, {bk}],{xl!r}>", "w_desc": f"tensordesc<i32[{bk}, {bn // 8}],{wl!r}>",
           "s_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
           "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    ints = (["M", "N", "num_units", "num_m", "splits", "T"] if cfg.persist else
            ["M", "N", "K", "tiles_per_split", "num_splits"]) + ["stride_sg", "stride_om", "magic", "zconst"]
    magic, base = im._W4_MAGIC[torch.bfloat16 if dtype == "bf16" else torch.float16]
    const = dict(MAGIC=magic, BASE=base, GROUP=128, HAS_ZP=zp, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 CHUNK=16 if bn >= 256 else 32, STAGES=cfg.stages, NB=cfg.ws, SPLIT=split, DQ=cfg.dq,
                 **({"NP": cfg.producers} if cfg.persist else {}), PRODUCER_REGS=112 if cfg.producers == 1 else 80,
                 num_warps=cfg.warps)
    sig.update(dict.fromkeys(ints, "i32"))
    sig.update(dict.fromkeys(const, "constexpr"))
    aligned = {"s_ptr", "z_ptr", "bias_ptr", "out_ptr", "part_ptr", "cnt_ptr", "N", "K", "stride_sg", "stride_om"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name in aligned}
    maxnreg = min(240, 65536 // ((cfg.warps + 4 * cfg.producers) * 32) // 8 * 8)
    kernel = _w4_wsp_kernel if cfg.persist else _w4_ws_kernel
    return triton.compile(GluonASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=cfg.warps, maxnreg=maxnreg))


def _ws_shapes() -> list[im.Config]:
    """The large-rows bucket's shapes (plain, persistent, two producers, Gluon dequantization) and the 64-row one
    (a single consumer warpgroup)."""
    return im._ws_candidates(1024) + im._ws_candidates(64)[:1]


@pytest.mark.skipif(cuobjdump() is None, reason="no bundled cuobjdump")
@pytest.mark.parametrize("cfg", _ws_shapes(),
                         ids=lambda c: f"m{c.block_m}n{c.block_n}s{c.stages}w{c.warps}b{c.ws}q{c.dq}" + "P" * c.persist
                         + "x2" * (c.producers > 1))
def test_int4_ws_kernel_shapes(cfg: im.Config):
    """The warp-specialized kernel (split-K epilogue with bias): TMA loads, one MMA group left in flight in the
    consumers' loop, registers moved from the producer warpgroup to the consumers, no spills, shared memory
    within 227 KB."""
    kernel = _compile_ws(cfg, split=True)
    sass, usage = sass_and_usage(kernel)
    assert "UTMALDG.2D" in sass and f"HGMMA.64x{cfg.block_n}x16.F32.BF16" in sass
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x1") == 1
    assert "setmaxnreg.inc" in kernel.asm["ptx"] and "setmaxnreg.dec" in kernel.asm["ptx"]
    assert re.search(r"LOCAL:0\b", usage), usage
    assert kernel.metadata.shared <= 227 * 1024


def test_int4_ws_compiles_fp16_symmetric():
    """fp16 activations, no zero points, no split: the other constexpr branches of the warp-specialized kernel."""
    kernel = _compile_ws(im._ws_candidates(1024)[0], split=False, zp=False, dtype="fp16")
    assert "wgmma.mma_async" in kernel.asm["ptx"]


def test_int4_wgmma_compiles_fp16_symmetric():
    """fp16 activations and symmetric weights (no zero points) take the other constexpr branches."""
    kernel = _compile(im._wgmma_candidates(64)[0], split=True, zp=False, dtype="fp16")
    assert "wgmma.mma_async" in kernel.asm["ptx"]


def test_int4_wgmma_shapes_are_offered_only_where_they_apply():
    """w4_supported refuses wgmma shapes below 64 rows a tile, with K / the group not a multiple of BLOCK_K or
    with x's rows off 16-byte alignment, and the tuner offers them only on sm_90 (here: none, on the CPU)."""
    import torch
    x = torch.zeros(64, 256, dtype=torch.bfloat16)
    w = im.repack_int4(torch.zeros(256, 128, dtype=torch.uint8), torch.ones(2, 128, dtype=torch.bfloat16),
                       None, 128)
    ok = im.Config(64, 64, 64, w4=True, wgmma=True)
    assert im.w4_supported(x, w, ok)
    assert not im.w4_supported(x, w, im.Config(32, 64, 64, w4=True, wgmma=True))
    assert not im.w4_supported(x, w, im.Config(64, 64, 256, w4=True, wgmma=True))
    assert not any(c.wgmma for c in im._candidates_for(64, x, w))
    # rows that do not start on 16 bytes (the kernel's cp.async copies need it): refused, not a compile error
    assert not im.w4_supported(torch.zeros(64, 264, dtype=torch.bfloat16)[:, 4:], w, ok)


def _compile_gemv(cfg, rows: int, split: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from aphrodite.kernels.gemv_gluon import _gemv_w4_kernel
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "bias_ptr": "*bf16",
            "out_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    ints = ["M", "N", "steps_per_split", "total_steps", "num_splits", "one", "stride_xm", "stride_wk", "stride_sg",
            "stride_om"]
    const = dict(ROWS=rows, GROUP=128, HAS_ZP=True, HAS_BIAS=True, KS=cfg.block_k, WK=cfg.wk, STAGES=cfg.stages,
                 SPLIT=split, num_warps=cfg.warps)
    sig = {**ptrs, **dict.fromkeys(ints, "i32"), **dict.fromkeys(const, "constexpr")}
    aligned = set(ptrs) | {"N", "stride_xm", "stride_wk", "stride_sg", "stride_om"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name in aligned}
    return triton.compile(GluonASTSource(_gemv_w4_kernel, sig, const, attrs),
                          target=GPUTarget("cuda", 90, 128), options=dict(num_warps=cfg.warps))


@pytest.mark.skipif(cuobjdump() is None, reason="no bundled cuobjdump")
@pytest.mark.parametrize("rows,split", [(1, True), (4, False)])
def test_int4_gluon_gemv_compiles_without_spills(rows: int, split: bool):
    """The Gluon GEMV's first shape at 1 and 4 rows: cp.async copies (16-byte) in the loop, no local memory."""
    from aphrodite.kernels.int4_matmul import FMT_INT4
    from aphrodite.kernels.quant_gemv import gluon_gemv_candidates
    kernel = _compile_gemv(gluon_gemv_candidates(FMT_INT4)[0], rows, split)
    sass, usage = sass_and_usage(kernel)
    assert "LDGSTS.E.BYPASS.128" in sass
    assert re.search(r"LOCAL:0\b", usage), usage


def test_fp8_gluon_gemv_compiles_without_spills():
    """The FP8 GEMV's first shape at one row, compiled for sm_90: 16-byte cp.async copies, fp8 -> f16x2
    unpacking, no local memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from aphrodite.kernels.gemv_gluon import _gemv_fp8_kernel
    from aphrodite.kernels.int4_matmul import FMT_FP8
    from aphrodite.kernels.quant_gemv import gluon_gemv_candidates
    if cuobjdump() is None:
        pytest.skip("no bundled cuobjdump")
    cfg = gluon_gemv_candidates(FMT_FP8)[0]
    sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
           "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"}
    const = dict(ROWS=1, HAS_BIAS=False, BLOCK_N=cfg.block, STAGES=cfg.stages, num_warps=cfg.warps)
    sig.update(dict.fromkeys(const, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if sig[name] != "constexpr"}
    kernel = triton.compile(GluonASTSource(_gemv_fp8_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 128),
                            options=dict(num_warps=cfg.warps))
    sass, usage = sass_and_usage(kernel)
    assert "LDGSTS.E.BYPASS.128" in sass and "E4M3" in sass
    assert re.search(r"LOCAL:0\b", usage), usage


def test_int4_wgmma_table_by_rows_and_width():
    """The H200 table: the swap form for 5..16 rows on every projection, 33..256 rows on the widest (gate_up)
    only, nothing from 257 rows (dequantize + cuBLAS wins there)."""
    for m in (5, 8, 12, 16):
        assert im._wgmma_table(m, 6144).swap and im._wgmma_table(m, 28672).swap
    for m in (40, 64, 100, 128, 200, 256):
        assert im._wgmma_table(m, 4096) is None and im._wgmma_table(m, 28672).wgmma
    assert im._wgmma_table(20, 28672) is None and im._wgmma_table(257, 28672) is None


def test_int4_dequant_rows_by_rows_and_width():
    """Dequantize + cuBLAS: from 257 rows everywhere, from 193 on the narrower projections (qkv, o, down), never at
    decode-sized batches (the fused kernels win there)."""
    for n in (4096, 6144, 28672):
        assert not im._dequant_rows(64, n) and not im._dequant_rows(128, n) and im._dequant_rows(257, n)
        assert im._dequant_rows(1024, n)
    assert im._dequant_rows(200, 4096) and im._dequant_rows(256, 6144)
    assert not im._dequant_rows(200, 28672) and not im._dequant_rows(192, 4096)


def test_int4_ws_shapes_are_offered_only_where_they_apply():
    """w4_supported refuses warp-specialized shapes whose rows are not 64 per consumer warpgroup, whose TMA boxes
    exceed a 128-byte swizzle row, or with two producers and an odd ring; the tuner offers them only on sm_90."""
    import torch
    x = torch.zeros(128, 256, dtype=torch.bfloat16)
    w = im.repack_int4(torch.zeros(256, 256, dtype=torch.uint8), torch.ones(2, 256, dtype=torch.bfloat16),
                       None, 128)
    c = im._wgmma_c
    assert im.w4_supported(x, w, c(128, 256, 64, 4, 8, ws=2))
    assert not im.w4_supported(x, w, c(64, 256, 64, 4, 8, ws=2))           # 8 warps = 2 warpgroups = 128 rows
    assert not im.w4_supported(x, w, c(128, 256, 128, 4, 8, ws=2))         # x box 256 bytes wide
    assert im.w4_supported(x, w, c(128, 128, 64, 6, 8, ws=4, persist=True, producers=2))
    assert not im.w4_supported(x, w, c(128, 128, 64, 6, 8, ws=3, persist=True, producers=2))
    assert all(c.ws and c.block_m == 16 * c.warps for b in (64, 128, 256, 1024) for c in im._ws_candidates(b))
    assert not any(c.ws for c in im._candidates_for(128, x, w))


def test_int4_ws_pair_arithmetic_matches_dequantize():
    """The warp-specialized producer's arithmetic (``_pairs_dequant``), replayed bit for bit on the CPU: per packed
    word, pair i = ((word >> 4i) & 0x000F000F) | magic read as two bf16, minus (zero pair + magic), times the
    scale pair, where int32 word 4w + i of the scales (and of the output tile) holds columns 8w + 2i, 8w + 2i + 1.
    Equal to ``dequantize`` (the reference) for every weight of a random group-128 layer."""
    import torch
    k, n = 256, 64
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (k, n), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(k // 128, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // 128, n), generator=gen).to(torch.bfloat16)
    w = im.repack_int4(codes, scales, zeros, 128)
    magic, _ = im._W4_MAGIC[torch.bfloat16]

    def pairs(words: torch.Tensor) -> torch.Tensor:       # int32 [..] -> bf16 [.., 2] (low half first)
        return words.contiguous().view(torch.int16).view(torch.bfloat16).reshape(*words.shape, 2)

    rows = torch.arange(k) // 128
    s32 = w.scales.contiguous().view(torch.int32)[rows]                      # [K, N / 2] scale pairs
    z32 = w.zeros.contiguous().view(torch.int32)[rows]
    zb = pairs(z32).float() + pairs(torch.full((1,), magic, dtype=torch.int32)).float()   # exact: small integers
    out = torch.empty(k, n // 2, 2, dtype=torch.bfloat16)
    for i in range(4):
        v = pairs(((w.weight >> (4 * i)) & 0x000F000F) | magic).float()        # [K, N / 8, 2] = BASE + q
        cols = slice(i, n // 2, 4)                                              # int32 words 4w + i
        out[:, cols] = ((v - zb[:, cols]).to(torch.bfloat16).float() * pairs(s32[:, cols]).float()).to(torch.bfloat16)
    assert torch.equal(out.reshape(k, n), im.dequantize(w, torch.bfloat16))
