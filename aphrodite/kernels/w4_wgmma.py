"""Batched W4A16 GEMM for Hopper written in Gluon (Triton's explicit-layout dialect): ``out = x @ dequant(W)``.

Why a second W4A16 kernel: the Triton kernel (``int4_matmul._w4_gemm_kernel``) leaves the pipeline to Triton,
which on sm_90 serializes every tensor-core MMA with the dequantization (the dequantized tile is a fresh
shared-memory buffer, so the compiler waits for each wgmma before the next step; with the tile as a
register operand ptxas reuses the operand registers and waits too). At 64+ rows that halves its speed
next to cuBLAS. Here the software pipeline is explicit:

* ``x``, the packed codes, scales and zeros of each K step arrive by ``cp.async`` in a ring of
  ``STAGES`` shared-memory slots (one commit group a step), issued ``STAGES - 1`` steps ahead;
* step k's codes are dequantized in registers (the exponent-bits trick of ``_w4_dequant``) and stored
  into one of two bf16 ``[BLOCK_K, BLOCK_N]`` shared tiles, then ``wgmma`` runs asynchronously on
  ``x``'s slot and that tile while step k + 1 is dequantized: one MMA is left in flight
  (``warpgroup_mma_wait(1)``), so the ALU work of a step hides under the previous step's MMA.

Same canonical int4 layout and the same arguments as the Triton kernel (no repacking, no extra memory);
fp16/bf16 activations, groups that are runs of ``GROUP`` stored rows, ``N % BLOCK_N == 0``,
``K % BLOCK_K == 0``. Split-K (fp32 partials + an arrival counter, the last program sums) as there.

Warp-specialized form (``w4_ws_launch``, 64+ rows), because in the form above every warp does both jobs and
meets two CTA-wide barriers a step, so a step costs the MMA plus the dequantization's latency chain:

* one producer warpgroup brings ``x`` and the packed codes by TMA into a ``STAGES``-deep ring (mbarrier
  ``ready``/``empty`` pairs) and dequantizes each step into a ring of ``NB`` bf16/fp16 tiles with packed PTX
  arithmetic (``_pairs_dequant``: one LOP3 a column pair, then sub + mul on bf16x2 words);
* the consumer warpgroups (64 rows each) only wait for a step's two tiles, issue its wgmma and, once the
  previous MMA is done, release that step's slots, so the tensor cores never wait on ALU work;
* ``_w4_wsp_kernel`` is the persistent variant: one program per SM walks (output tile, K split) units and
  the producer's ring runs on into the next unit while the consumers store the previous one (optionally
  with a second producer warpgroup taking every other K step).

Gluon has no CPU interpreter, so these kernels run on Hopper GPUs only; their correctness is checked at
real sizes by ``benchmarks/gpu/bench_w4_gemm.py`` and ``bench_quant_gemm.py --check-only`` against dequantize +
matmul, and on the CPU they are compiled for sm_90 (``tests/quantization/test_w4_wgmma.py``: MMAs kept in
flight, no spills, shared memory within bounds) while the dequantization arithmetic is covered through the
Triton kernel's interpreter tests.
"""
from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAS_GLUON = True
except ImportError:  # pragma: no cover - Triton without Gluon (or no Triton)
    HAS_GLUON = False

__all__ = ["HAS_GLUON", "wgmma_supported", "w4_wgmma_launch", "w4_ws_launch"]


def wgmma_supported(device: torch.device) -> bool:
    """Gluon present and an sm_90 device (wgmma is Hopper-only; Blackwell has tcgen05 instead)."""
    return HAS_GLUON and device.type == "cuda" and _capability(device.index or 0) == (9, 0)


@functools.lru_cache(maxsize=8)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


if HAS_GLUON:

    @gluon.constexpr_function
    def _warps_per_cta(block_m, num_warps):
        """Warpgroups stacked along M (64 rows each) first, then side by side along N."""
        wm = 4
        while wm * 2 <= num_warps and block_m > 16 * wm:
            wm *= 2
        return [wm, num_warps // wm]

    @gluon.constexpr_function
    def _instr_n(block_m, block_n, num_warps):
        wm = 4
        while wm * 2 <= num_warps and block_m > 16 * wm:
            wm *= 2
        per_warp_n = block_n // (num_warps // wm)
        n = 256
        while n > per_warp_n or per_warp_n % n:
            n -= 8
        return n

    @gluon.constexpr_function
    def _threads(cols, vec):
        """Threads of a warp along a row of ``cols`` elements read ``vec`` at a time (a power of two <= 32)."""
        t = max(1, cols // vec)
        return min(t, 32)

    @gluon.jit
    def _dequant_tile(p, s, z, magic, W_LAYOUT: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                      BASE: gl.constexpr, HAS_ZP: gl.constexpr):
        """Packed int32 ``[BLOCK_K, BLOCK_N // 8]`` -> ``[BLOCK_K, BLOCK_N]`` in the scales' dtype, as
        ``int4_matmul._w4_dequant``: OR-ing exponent bits over nibble pairs makes ``BASE + q`` in each half
        of a 32-bit register, then ``(v - (BASE + z)) * s`` in packed half arithmetic (exact subtraction,
        one rounding, like the reference)."""
        t0 = (p & 0x000F000F) | magic
        t1 = ((p >> 4) & 0x000F000F) | magic
        t2 = ((p >> 8) & 0x000F000F) | magic
        t3 = ((p >> 12) & 0x000F000F) | magic
        v = gl.join(gl.join(gl.join(t0.to(gl.int16), t2.to(gl.int16)), gl.join(t1.to(gl.int16), t3.to(gl.int16))),
                    gl.join(gl.join((t0 >> 16).to(gl.int16), (t2 >> 16).to(gl.int16)),
                            gl.join((t1 >> 16).to(gl.int16), (t3 >> 16).to(gl.int16))))
        v = gl.reshape(v, [BLOCK_K, BLOCK_N])
        v = gl.convert_layout(v, W_LAYOUT, assert_trivial=True)
        if HAS_ZP:
            zb = (z.to(gl.float32) + BASE).to(s.dtype)
        else:
            zb = gl.full([BLOCK_N], BASE + 8.0, s.dtype, s.type.layout)
        return (v.to(s.dtype, bitcast=True) - gl.expand_dims(zb, 0)) * gl.expand_dims(s, 0)

    @gluon.jit
    def _issue_loads(x_ptrs, w_ptrs, s_ptrs, z_ptrs, x_buf, p_buf, s_buf, z_buf, slot, kt, n_tiles, k_lo,
                     stride_wk, stride_sg, BLOCK_K: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr):
        """One K step's ``x``, codes, scales and zeros into ring slot ``slot`` (one commit group; past the
        split's last step the copies are masked off so every step commits a group)."""
        ok = kt < n_tiles
        k0 = kt * BLOCK_K
        cp.async_copy_global_to_shared(x_buf.index(slot), x_ptrs + k0, mask=ok)
        cp.async_copy_global_to_shared(p_buf.index(slot), w_ptrs + k0 * stride_wk, mask=ok)
        g = ((k_lo + k0) // GROUP) * stride_sg
        cp.async_copy_global_to_shared(s_buf.index(slot), s_ptrs + g, mask=ok)
        if HAS_ZP:
            cp.async_copy_global_to_shared(z_buf.index(slot), z_ptrs + g, mask=ok)
        cp.commit_group()

    @gluon.jit
    def _store_tile(acc, om, on, bias_ptr, out_ptr, part_ptr, cnt_ptr, M, N, tile, pid_k, num_splits, stride_om,
                    HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr):
        """Store a finished accumulator at rows ``om`` x columns ``on``: directly, or (split-K) as an fp32
        partial that the last of the tile's splits to arrive (counter ``tile``, re-armed by it) sums into the
        output. Shared by the plain and the warp-specialized kernels."""
        dtype: gl.constexpr = out_ptr.dtype.element_ty
        o_mask = om < M
        o_off = om.to(gl.int64) * stride_om + on
        if SPLIT:
            p_off = (pid_k * M + om).to(gl.int64) * N + on
            gl.store(part_ptr + p_off, acc, mask=o_mask)
            gl.thread_barrier()
            cnt = cnt_ptr + tile
            done = gl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:
                gl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
                total = gl.zeros_like(acc)
                for sp in range(0, num_splits):
                    p_off = (sp * M + om).to(gl.int64) * N + on
                    total += gl.load(part_ptr + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += gl.load(bias_ptr + on).to(gl.float32)
                gl.store(out_ptr + o_off, total.to(dtype), mask=o_mask)
        else:
            if HAS_BIAS:
                acc += gl.load(bias_ptr + on).to(gl.float32)
            gl.store(out_ptr + o_off, acc.to(dtype), mask=o_mask)

    @gluon.jit
    def _w4_wgmma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                         M, N, K, tiles_per_split, num_splits, magic,
                         stride_xm, stride_wk, stride_sg, stride_om,
                         BASE: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr, HAS_BIAS: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                         STAGES: gl.constexpr, SPLIT: gl.constexpr, SWAP: gl.constexpr, num_warps: gl.constexpr):
        BW: gl.constexpr = BLOCK_N // 8
        dtype: gl.constexpr = s_ptr.dtype.element_ty
        # Register layouts: async-copy sources (16-byte vectors), the packed codes as dequantized (one word a
        # thread per row, so the dequantized tile holds 8 consecutive outputs a thread: 16-byte shared
        # stores) and the wgmma accumulator.
        TXK: gl.constexpr = _threads(BLOCK_K, 8)
        X_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TXK, TXK], [num_warps, 1], [1, 0])
        TPC: gl.constexpr = _threads(BW, 4)
        PC_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPC, TPC], [num_warps, 1], [1, 0])
        TPW: gl.constexpr = _threads(BW, 1)
        P_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 1], [32 // TPW, TPW], [num_warps, 1], [1, 0])
        W_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW, TPW], [num_warps, 1], [1, 0])
        S_LAYOUT: gl.constexpr = gl.SliceLayout(0, W_LAYOUT)
        SC_LAYOUT: gl.constexpr = gl.BlockedLayout([8], [32], [num_warps], [0])
        if SWAP:    # out^T = W^T x^T: the weight tile is the MMA's 64-row side, the rows of x its N (16..32)
            MMA_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_N, num_warps),
                instr_shape=[16, _instr_n(BLOCK_N, BLOCK_M, num_warps), 16])
        else:
            MMA_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=_warps_per_cta(BLOCK_M, num_warps),
                instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 16])
        X_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
        B_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], dtype)
        P_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        V_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_m = gl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        k_lo = pid_k * tiles_per_split * BLOCK_K
        n_tiles = gl.minimum(tiles_per_split, K // BLOCK_K - pid_k * tiles_per_split)

        # Source pointers of step 0 of this split (later steps add kt * BLOCK_K rows / columns). Rows past M
        # read row m % M: no masks, and the stores drop them.
        xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, X_LAYOUT))
        xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, X_LAYOUT))
        x_ptrs = x_ptr + gl.expand_dims((xm % M).to(gl.int64) * stride_xm, 1) + gl.expand_dims(k_lo + xk, 0)
        pk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, PC_LAYOUT))
        pw = pid_n * BW + gl.arange(0, BW, layout=gl.SliceLayout(0, PC_LAYOUT))
        w_ptrs = w_ptr + gl.expand_dims((k_lo + pk).to(gl.int64) * stride_wk, 1) + gl.expand_dims(pw, 0)
        sn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=SC_LAYOUT)
        s_ptrs = s_ptr + sn
        z_ptrs = z_ptr + sn

        x_buf = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], X_SMEM)
        p_buf = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_K, BW], P_SMEM)
        s_buf = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N], V_SMEM)
        if HAS_ZP:
            z_buf = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N], V_SMEM)
        else:
            z_buf = s_buf
        b_buf = gl.allocate_shared_memory(dtype, [2, BLOCK_K, BLOCK_N], B_SMEM)

        for i in gl.static_range(STAGES - 1):
            _issue_loads(x_ptrs, w_ptrs, s_ptrs, z_ptrs, x_buf, p_buf, s_buf, z_buf, i, i, n_tiles, k_lo,
                         stride_wk, stride_sg, BLOCK_K, GROUP, HAS_ZP)

        if SWAP:
            acc = gl.zeros([BLOCK_N, BLOCK_M], dtype=gl.float32, layout=MMA_LAYOUT)
        else:
            acc = gl.zeros([BLOCK_M, BLOCK_N], dtype=gl.float32, layout=MMA_LAYOUT)
        slot = 0
        for kt in range(0, n_tiles):
            cp.wait_group(STAGES - 2)           # step kt's group has landed (this thread's copies)
            gl.thread_barrier()                 # ... and every thread's
            p = p_buf.index(slot).load(P_LAYOUT)
            s = s_buf.index(slot).load(S_LAYOUT)
            if HAS_ZP:
                z = z_buf.index(slot).load(S_LAYOUT)
            else:
                z = s
            w = _dequant_tile(p, s, z, magic, W_LAYOUT, BLOCK_K, BLOCK_N, BASE, HAS_ZP)
            b = b_buf.index(kt % 2)             # read by the MMA of step kt - 2, finished (at most one in flight)
            b.store(w)
            fence_async_shared()                # generic-proxy writes (the tile, the cp.async data) -> wgmma
            gl.thread_barrier()
            if SWAP:
                acc = warpgroup_mma(b.permute((1, 0)), x_buf.index(slot).permute((1, 0)), acc, is_async=True)
            else:
                acc = warpgroup_mma(x_buf.index(slot), b, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # Every warpgroup's MMA of step kt - 1 is done (the barrier), so its ring slot (slot - 1) takes
            # step kt + STAGES - 1 and its dequantized tile is free for step kt + 1.
            gl.thread_barrier()
            nxt = slot + STAGES - 1
            nxt = gl.where(nxt >= STAGES, nxt - STAGES, nxt)
            _issue_loads(x_ptrs, w_ptrs, s_ptrs, z_ptrs, x_buf, p_buf, s_buf, z_buf, nxt, kt + STAGES - 1,
                         n_tiles, k_lo, stride_wk, stride_sg, BLOCK_K, GROUP, HAS_ZP)
            slot = gl.where(slot + 1 >= STAGES, 0, slot + 1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        cp.wait_group(0)

        if SWAP:    # acc[n, m]
            om = gl.expand_dims(pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA_LAYOUT)), 0)
            on = gl.expand_dims(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA_LAYOUT)), 1)
        else:
            om = gl.expand_dims(pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, MMA_LAYOUT)), 1)
            on = gl.expand_dims(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA_LAYOUT)), 0)
        _store_tile(acc, om, on, bias_ptr, out_ptr, part_ptr, cnt_ptr, M, N, pid, pid_k, num_splits, stride_om,
                    HAS_BIAS, SPLIT)


def w4_wgmma_launch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bias: torch.Tensor | None, out: torch.Tensor, part: torch.Tensor | None,
                    cnt: torch.Tensor | None, *, k: int, n: int, group: int, magic: int, base: float,
                    block_m: int, block_n: int, block_k: int, stages: int, warps: int, splits: int,
                    tiles_per_split: int, swap: bool = False) -> None:
    """Launch ``_w4_wgmma_kernel`` (the caller picked the tile, split-K and buffers; see
    ``int4_matmul._launch_w4``)."""
    m = x.shape[0]
    grid = ((n // block_n) * ((m + block_m - 1) // block_m), splits)
    dummy = scales
    _w4_wgmma_kernel[grid](
        x, weight, scales, zeros if zeros is not None else dummy, bias if bias is not None else dummy, out,
        part if part is not None else out, cnt if cnt is not None else out,
        m, n, k, tiles_per_split, splits, magic, x.stride(0), weight.stride(0), scales.stride(0), out.stride(0),
        BASE=base, GROUP=group, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, SPLIT=splits > 1, SWAP=swap, num_warps=warps)


# --------------------------------------------------------------------------------------------------
# Warp-specialized form for 64+ rows: TMA producer + dequant warpgroup, consumer warpgroups run wgmma only
# --------------------------------------------------------------------------------------------------

if HAS_GLUON:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

    @gluon.jit
    def _pairs_dequant(p, zb0, zb1, zb2, zb3, s0, s1, s2, s3, magic, HALF: gl.constexpr):
        """Packed int32 codes -> four int32 registers, each two dequantized half floats (columns 2i, 2i + 1 of
        the word, ``INT4_ORDER``): per pair one LOP3 makes ``BASE + q``, then ``(v - (BASE + z)) * s`` in packed
        bf16x2 / f16x2 arithmetic (exact subtraction, one rounding) with ``zb``/``s`` pairs as int32 words."""
        if HALF == 0:
            ops: gl.constexpr = "bf16x2"
        else:
            ops: gl.constexpr = "f16x2"
        return gl.inline_asm_elementwise(
            "{ .reg .b32 t1, t2, t3;\n"
            "lop3.b32 $0, $4, 0x000f000f, $13, 0xea;\n"
            "shr.u32 t1, $4, 4;\n shr.u32 t2, $4, 8;\n shr.u32 t3, $4, 12;\n"
            "lop3.b32 $1, t1, 0x000f000f, $13, 0xea;\n"
            "lop3.b32 $2, t2, 0x000f000f, $13, 0xea;\n"
            "lop3.b32 $3, t3, 0x000f000f, $13, 0xea;\n"
            "sub.rn." + ops + " $0, $0, $5;\n sub.rn." + ops + " $1, $1, $6;\n"
            "sub.rn." + ops + " $2, $2, $7;\n sub.rn." + ops + " $3, $3, $8;\n"
            "mul.rn." + ops + " $0, $0, $9;\n mul.rn." + ops + " $1, $1, $10;\n"
            "mul.rn." + ops + " $2, $2, $11;\n mul.rn." + ops + " $3, $3, $12;\n }",
            "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
            [p, zb0, zb1, zb2, zb3, s0, s1, s2, s3, magic],
            (gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)

    @gluon.jit
    def _half_pair_add(a, b, HALF: gl.constexpr):
        """``a + b`` on int32 words read as two bf16 / fp16 values each (``BASE + z`` for a pair of columns)."""
        if HALF == 0:
            asm: gl.constexpr = "add.rn.bf16x2 $0, $1, $2;"
        else:
            asm: gl.constexpr = "add.rn.f16x2 $0, $1, $2;"
        return gl.inline_asm_elementwise(asm, "=r,r,r", [a, b], gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _ws_pairs_load(s32_ptr, z32_ptr, g, pw, HAS_ZP: gl.constexpr):
        """The scale (and zero) pairs of one K step's group as int32 words: word ``4 w + i`` of the tile holds
        columns ``8 w + 2 i``, ``8 w + 2 i + 1`` (loaded a step ahead of their use)."""
        sp = s32_ptr + g + pw * 4
        s0 = gl.load(sp)
        s1 = gl.load(sp + 1)
        s2 = gl.load(sp + 2)
        s3 = gl.load(sp + 3)
        if HAS_ZP:
            zp = z32_ptr + g + pw * 4
            z0 = gl.load(zp)
            z1 = gl.load(zp + 1)
            z2 = gl.load(zp + 2)
            z3 = gl.load(zp + 3)
        else:
            z0 = s0
            z1 = s1
            z2 = s2
            z3 = s3
        return s0, s1, s2, s3, z0, z1, z2, z3

    @gluon.jit
    def _ws_dequant_pairs(p_smem, b_smem, s0, s1, s2, s3, z0, z1, z2, z3, magic, zconst, HAS_ZP: gl.constexpr,
                          HALF: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, CHUNK: gl.constexpr,
                          P_LAYOUT: gl.constexpr):
        """One K step in the producer with ``_pairs_dequant`` (pairs from ``_ws_pairs_load``), the result stored
        through an int32 view of the (byte-identical, 128-byte swizzled) bf16 tile."""
        Q_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], P_LAYOUT.threads_per_warp, P_LAYOUT.warps_per_cta, [1, 0])
        if HAS_ZP:
            zb0 = gl.expand_dims(_half_pair_add(z0, magic, HALF), 0)
            zb1 = gl.expand_dims(_half_pair_add(z1, magic, HALF), 0)
            zb2 = gl.expand_dims(_half_pair_add(z2, magic, HALF), 0)
            zb3 = gl.expand_dims(_half_pair_add(z3, magic, HALF), 0)
        else:
            zb0 = gl.expand_dims(gl.zeros_like(s0) + zconst, 0)
            zb1 = zb0
            zb2 = zb0
            zb3 = zb0
        sb0 = gl.expand_dims(s0, 0)
        sb1 = gl.expand_dims(s1, 0)
        sb2 = gl.expand_dims(s2, 0)
        sb3 = gl.expand_dims(s3, 0)
        B32: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        b32 = b_smem._reinterpret(gl.int32, [BLOCK_K, BLOCK_N // 2], B32)
        for c in gl.static_range(BLOCK_K // CHUNK):
            p = p_smem.slice(c * CHUNK, CHUNK, dim=0).load(P_LAYOUT)
            o0, o1, o2, o3 = _pairs_dequant(p, zb0, zb1, zb2, zb3, sb0, sb1, sb2, sb3, magic, HALF)
            o = gl.reshape(gl.join(gl.join(o0, o2), gl.join(o1, o3)), [CHUNK, BLOCK_N // 2])
            o = gl.convert_layout(o, Q_LAYOUT, assert_trivial=True)
            b32.slice(c * CHUNK, CHUNK, dim=0).store(o)

    @gluon.jit
    def _ws_producer(x_desc, w_desc, s_ptr, z_ptr, x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty,
                     off_m, off_n, k_lo, n_tiles, stride_sg, magic, zconst,
                     MAGIC: gl.constexpr, BASE: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, CHUNK: gl.constexpr, STAGES: gl.constexpr,
                     NB: gl.constexpr, DQ: gl.constexpr):
        """One warpgroup: TMA of ``x`` and the packed codes ``STAGES - 1`` steps ahead, then each step's
        dequantization into the bf16 ring ``b_buf`` (``NB`` tiles) that the consumers' wgmma reads."""
        BW: gl.constexpr = BLOCK_N // 8
        PW: gl.constexpr = 4
        TPW: gl.constexpr = _threads(BW, 1)
        P_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 1], [32 // TPW, TPW], [PW, 1], [1, 0])
        W_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW, TPW], [PW, 1], [1, 0])
        S_LAYOUT: gl.constexpr = gl.SliceLayout(0, W_LAYOUT)
        NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        for i in gl.static_range(STAGES - 1):
            ok = i < n_tiles
            mbarrier.expect(ready.index(i), NBYTES, pred=ok)
            tma.async_copy_global_to_shared(x_desc, [off_m, k_lo + i * BLOCK_K], ready.index(i), x_buf.index(i),
                                            pred=ok)
            tma.async_copy_global_to_shared(w_desc, [k_lo + i * BLOCK_K, off_n // 8], ready.index(i),
                                            p_buf.index(i), pred=ok)
        sn = off_n + gl.arange(0, BLOCK_N, layout=S_LAYOUT)
        pw = off_n // 8 + gl.arange(0, BW, layout=gl.SliceLayout(0, P_LAYOUT))
        s32_ptr = s_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        z32_ptr = z_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        HALF: gl.constexpr = 0 if s_ptr.dtype.element_ty == gl.bfloat16 else 1
        s0, s1, s2, s3, z0, z1, z2, z3 = _ws_pairs_load(s32_ptr, z32_ptr, ((k_lo // GROUP) * stride_sg) // 2, pw,
                                                        HAS_ZP)
        for kt in range(0, n_tiles):
            slot = kt % STAGES
            g = ((k_lo + kt * BLOCK_K) // GROUP) * stride_sg
            if DQ == 0:
                s = gl.load(s_ptr + g + sn)
                if HAS_ZP:
                    z = gl.load(z_ptr + g + sn)
                else:
                    z = s
            else:       # this step's pairs, loaded a step ago
                c0, c1, c2, c3, y0, y1, y2, y3 = s0, s1, s2, s3, z0, z1, z2, z3
            mbarrier.wait(ready.index(slot), (kt // STAGES) & 1)
            j = kt % NB
            mbarrier.wait(b_empty.index(j), ((kt // NB) & 1) ^ 1)
            if DQ == 0:
                for c in gl.static_range(BLOCK_K // CHUNK):
                    p = p_buf.index(slot).slice(c * CHUNK, CHUNK, dim=0).load(P_LAYOUT)
                    w = _dequant_tile(p, s, z, MAGIC, W_LAYOUT, CHUNK, BLOCK_N, BASE, HAS_ZP)
                    b_buf.index(j).slice(c * CHUNK, CHUNK, dim=0).store(w)
            else:
                _ws_dequant_pairs(p_buf.index(slot), b_buf.index(j), c0, c1, c2, c3, y0, y1, y2, y3, magic, zconst,
                                  HAS_ZP, HALF, BLOCK_N, BLOCK_K, CHUNK, P_LAYOUT)
            fence_async_shared()            # the tile (generic proxy) -> wgmma; our code reads -> later TMA writes
            gl.thread_barrier()             # every producer thread's stores and reads are done
            mbarrier.arrive(b_ready.index(j))
            # Refill the slot of step kt - 1 (its x was read by the consumers' MMA kt - 1, its codes by us).
            nk = kt + STAGES - 1
            ok = nk < n_tiles
            ns = nk % STAGES
            mbarrier.wait(empty.index(ns), ((nk // STAGES) & 1) ^ 1, pred=ok)
            mbarrier.expect(ready.index(ns), NBYTES, pred=ok)
            tma.async_copy_global_to_shared(x_desc, [off_m, k_lo + nk * BLOCK_K], ready.index(ns), x_buf.index(ns),
                                            pred=ok)
            tma.async_copy_global_to_shared(w_desc, [k_lo + nk * BLOCK_K, off_n // 8], ready.index(ns),
                                            p_buf.index(ns), pred=ok)
            if DQ == 1:
                # The next step's pairs, issued only now: fence.proxy.async (MEMBAR) waits for this thread's
                # outstanding loads, so loads issued before it would put their latency on every step.
                gn = ((k_lo + gl.minimum(kt + 1, n_tiles - 1) * BLOCK_K) // GROUP) * stride_sg
                s0, s1, s2, s3, z0, z1, z2, z3 = _ws_pairs_load(s32_ptr, z32_ptr, gn // 2, pw, HAS_ZP)

    @gluon.jit
    def _ws_epilogue(acc, bias_ptr, out_ptr, part_ptr, cnt_ptr, M, N, off_m, off_n, tile, pid_k, num_splits,
                     stride_om, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     SPLIT: gl.constexpr, MMA_LAYOUT: gl.constexpr):
        """Store a finished accumulator of the tile at (``off_m``, ``off_n``) through ``_store_tile``."""
        om = gl.expand_dims(off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, MMA_LAYOUT)), 1)
        on = gl.expand_dims(off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA_LAYOUT)), 0)
        _store_tile(acc, om, on, bias_ptr, out_ptr, part_ptr, cnt_ptr, M, N, tile, pid_k, num_splits, stride_om,
                    HAS_BIAS, SPLIT)

    @gluon.jit
    def _ws_consumer(x_buf, b_buf, ready, empty, b_ready, b_empty, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                     M, N, off_m, off_n, n_tiles, pid, pid_k, num_splits, stride_om,
                     HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, NB: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
        """The default partition (``num_warps // 4`` warpgroups stacked along M, 64 rows each): waits for a
        step's ``x`` and dequantized tile, issues its wgmma, and once the previous step's MMA is done releases
        that step's slots; then the epilogue (split-K as in ``_w4_wgmma_kernel``)."""
        MMA_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
        acc = gl.zeros([BLOCK_M, BLOCK_N], dtype=gl.float32, layout=MMA_LAYOUT)
        for kt in range(0, n_tiles):
            slot = kt % STAGES
            j = kt % NB
            mbarrier.wait(ready.index(slot), (kt // STAGES) & 1)
            mbarrier.wait(b_ready.index(j), (kt // NB) & 1)
            acc = warpgroup_mma(x_buf.index(slot), b_buf.index(j), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            gl.thread_barrier()             # every consumer warpgroup's MMA kt - 1 is done
            prev = kt - 1
            mbarrier.arrive(empty.index((prev + STAGES) % STAGES), pred=kt > 0)
            mbarrier.arrive(b_empty.index((prev + NB) % NB), pred=kt > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _ws_epilogue(acc, bias_ptr, out_ptr, part_ptr, cnt_ptr, M, N, off_m, off_n, pid, pid_k, num_splits,
                     stride_om, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT, MMA_LAYOUT)

    @gluon.jit
    def _ws_rings(x_desc, w_desc, dtype: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  STAGES: gl.constexpr, NB: gl.constexpr):
        """The warp-specialized kernels' shared memory: the TMA ring of x and packed codes (``STAGES``), the
        ring of dequantized bf16 tiles (``NB``), and their ready/empty barriers, initialised and fenced."""
        B_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], dtype)
        x_buf = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        p_buf = gl.allocate_shared_memory(gl.int32, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        b_buf = gl.allocate_shared_memory(dtype, [NB, BLOCK_K, BLOCK_N], B_SMEM)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        b_ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        b_empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(NB):
            mbarrier.init(b_ready.index(i), count=1)
            mbarrier.init(b_empty.index(i), count=1)
        fence_async_shared()
        return x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty

    @gluon.jit
    def _w4_ws_kernel(x_desc, w_desc, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                      M, N, K, tiles_per_split, num_splits, stride_sg, stride_om, magic, zconst,
                      MAGIC: gl.constexpr, BASE: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr,
                      HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      CHUNK: gl.constexpr, STAGES: gl.constexpr, NB: gl.constexpr, SPLIT: gl.constexpr,
                      DQ: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """``out = x @ dequant(W)`` with warp specialization (see ``w4_ws_launch``)."""
        dtype: gl.constexpr = x_desc.dtype
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_m = gl.cdiv(M, BLOCK_M)
        off_m = (pid % num_m) * BLOCK_M
        off_n = (pid // num_m) * BLOCK_N
        k_lo = pid_k * tiles_per_split * BLOCK_K
        n_tiles = gl.minimum(tiles_per_split, K // BLOCK_K - pid_k * tiles_per_split)

        x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty = _ws_rings(x_desc, w_desc, dtype, BLOCK_N, BLOCK_K,
                                                                        STAGES, NB)

        gl.warp_specialize([
            (_ws_consumer, (x_buf, b_buf, ready, empty, b_ready, b_empty, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                            M, N, off_m, off_n, n_tiles, pid, pid_k, num_splits, stride_om,
                            HAS_BIAS, BLOCK_M, BLOCK_N, STAGES, NB, SPLIT, num_warps)),
            (_ws_producer, (x_desc, w_desc, s_ptr, z_ptr, x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty,
                            off_m, off_n, k_lo, n_tiles, stride_sg, magic, zconst, MAGIC, BASE, GROUP, HAS_ZP,
                            BLOCK_N, BLOCK_K, CHUNK, STAGES, NB, DQ)),
        ], [4], [PRODUCER_REGS])

    # ----------------------------------------------------------------------------------------------
    # Persistent form: one program per SM walks work units (output tile x K split) with a stride of the
    # grid; the producer's ring runs on into the next unit while the consumers store the previous one.
    # ----------------------------------------------------------------------------------------------

    @gluon.jit
    def _wsp_unit(u, num_m, splits, T, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """Work unit ``u`` -> (row offset, column offset, first K row, output tile, split); rows fastest, then
        splits, then columns, so programs running together share weight tiles through L2."""
        pid_m = u % num_m
        r = u // num_m
        pid_k = r % splits
        pid_n = r // splits
        return pid_m * BLOCK_M, pid_n * BLOCK_N, pid_k * T * BLOCK_K, pid_n * num_m + pid_m, pid_k

    @gluon.jit
    def _wsp_issue(x_desc, w_desc, x_buf, p_buf, ready, step, pid, nprog, num_m, splits, T, ok,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """TMA of this program's ``step``-th K step (of all its units) into ring slot ``step % STAGES``."""
        NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        off_m, off_n, k_lo, tile, pid_k = _wsp_unit(pid + (step // T) * nprog, num_m, splits, T, BLOCK_M, BLOCK_N,
                                                   BLOCK_K)
        k0 = k_lo + (step % T) * BLOCK_K
        sl = step % STAGES
        mbarrier.expect(ready.index(sl), NBYTES, pred=ok)
        tma.async_copy_global_to_shared(x_desc, [off_m, k0], ready.index(sl), x_buf.index(sl), pred=ok)
        tma.async_copy_global_to_shared(w_desc, [k0, off_n // 8], ready.index(sl), p_buf.index(sl), pred=ok)

    @gluon.jit
    def _wsp_producer(x_desc, w_desc, s_ptr, z_ptr, x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty,
                      num_units, num_m, splits, T, stride_sg, magic, zconst,
                      MAGIC: gl.constexpr, BASE: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, CHUNK: gl.constexpr,
                      STAGES: gl.constexpr, NB: gl.constexpr, DQ: gl.constexpr, NP: gl.constexpr,
                      PIDX: gl.constexpr):
        """``_ws_producer`` over all of this program's units as one stream of K steps; with ``NP`` producer
        warpgroups this one (``PIDX``) takes the steps ``PIDX (mod NP)`` and refills its own ring slots."""
        BW: gl.constexpr = BLOCK_N // 8
        PW: gl.constexpr = 4
        TPW: gl.constexpr = _threads(BW, 1)
        P_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 1], [32 // TPW, TPW], [PW, 1], [1, 0])
        W_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW, TPW], [PW, 1], [1, 0])
        S_LAYOUT: gl.constexpr = gl.SliceLayout(0, W_LAYOUT)
        HALF: gl.constexpr = 0 if s_ptr.dtype.element_ty == gl.bfloat16 else 1
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total = ((num_units - 1 - pid) // nprog + 1) * T
        for i in gl.static_range(STAGES - NP):
            if i % NP == PIDX:
                _wsp_issue(x_desc, w_desc, x_buf, p_buf, ready, i, pid, nprog, num_m, splits, T, i < total,
                           BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
        s32_ptr = s_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        z32_ptr = z_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        arw = gl.arange(0, BW, layout=gl.SliceLayout(0, P_LAYOUT))
        first = gl.minimum(PIDX, total - 1)
        off_m, off_n, k_lo, tile, pid_k = _wsp_unit(pid + (first // T) * nprog, num_m, splits, T, BLOCK_M, BLOCK_N,
                                                   BLOCK_K)
        s0, s1, s2, s3, z0, z1, z2, z3 = _ws_pairs_load(
            s32_ptr, z32_ptr, (((k_lo + (first % T) * BLOCK_K) // GROUP) * stride_sg) // 2, off_n // 8 + arw, HAS_ZP)
        for step in range(PIDX, total, NP):
            off_m, off_n, k_lo, tile, pid_k = _wsp_unit(pid + (step // T) * nprog, num_m, splits, T, BLOCK_M,
                                                       BLOCK_N, BLOCK_K)
            g = ((k_lo + (step % T) * BLOCK_K) // GROUP) * stride_sg
            if DQ == 0:
                sn = off_n + gl.arange(0, BLOCK_N, layout=S_LAYOUT)
                s = gl.load(s_ptr + g + sn)
                if HAS_ZP:
                    z = gl.load(z_ptr + g + sn)
                else:
                    z = s
            else:       # this step's pairs, loaded a step ago
                c0, c1, c2, c3, y0, y1, y2, y3 = s0, s1, s2, s3, z0, z1, z2, z3
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            j = step % NB
            mbarrier.wait(b_empty.index(j), ((step // NB) & 1) ^ 1)
            if DQ == 0:
                for c in gl.static_range(BLOCK_K // CHUNK):
                    p = p_buf.index(slot).slice(c * CHUNK, CHUNK, dim=0).load(P_LAYOUT)
                    w = _dequant_tile(p, s, z, MAGIC, W_LAYOUT, CHUNK, BLOCK_N, BASE, HAS_ZP)
                    b_buf.index(j).slice(c * CHUNK, CHUNK, dim=0).store(w)
            else:
                _ws_dequant_pairs(p_buf.index(slot), b_buf.index(j), c0, c1, c2, c3, y0, y1, y2, y3, magic, zconst,
                                  HAS_ZP, HALF, BLOCK_N, BLOCK_K, CHUNK, P_LAYOUT)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(b_ready.index(j))
            nk = step + STAGES - NP
            ok = nk < total
            mbarrier.wait(empty.index(nk % STAGES), ((nk // STAGES) & 1) ^ 1, pred=ok)
            _wsp_issue(x_desc, w_desc, x_buf, p_buf, ready, nk, pid, nprog, num_m, splits, T, ok,
                       BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
            if DQ == 1:     # the next own step's pairs, after the fence (see _ws_producer)
                nx = gl.minimum(step + NP, total - 1)
                xm, xn, xk, xt, xs = _wsp_unit(pid + (nx // T) * nprog, num_m, splits, T, BLOCK_M, BLOCK_N, BLOCK_K)
                s0, s1, s2, s3, z0, z1, z2, z3 = _ws_pairs_load(
                    s32_ptr, z32_ptr, (((xk + (nx % T) * BLOCK_K) // GROUP) * stride_sg) // 2, xn // 8 + arw, HAS_ZP)

    @gluon.jit
    def _wsp_consumer(x_buf, b_buf, ready, empty, b_ready, b_empty, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                      M, N, num_units, num_m, splits, T, stride_om,
                      HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr, NB: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
        """``_ws_consumer`` over this program's units: a unit's last step is released after its final MMA wait,
        then its epilogue runs while the producer fills the ring for the next unit."""
        MMA_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        mine = (num_units - 1 - pid) // nprog + 1
        base = 0
        for i in range(0, mine):
            off_m, off_n, k_lo, tile, pid_k = _wsp_unit(pid + i * nprog, num_m, splits, T, BLOCK_M, BLOCK_N,
                                                       BLOCK_K)
            acc = gl.zeros([BLOCK_M, BLOCK_N], dtype=gl.float32, layout=MMA_LAYOUT)
            for kt in range(0, T):
                step = base + kt
                slot = step % STAGES
                j = step % NB
                mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
                mbarrier.wait(b_ready.index(j), (step // NB) & 1)
                acc = warpgroup_mma(x_buf.index(slot), b_buf.index(j), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                gl.thread_barrier()
                prev = step - 1
                mbarrier.arrive(empty.index((prev + STAGES) % STAGES), pred=kt > 0)
                mbarrier.arrive(b_empty.index((prev + NB) % NB), pred=kt > 0)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            base += T
            gl.thread_barrier()
            last = base - 1
            mbarrier.arrive(empty.index(last % STAGES))
            mbarrier.arrive(b_empty.index(last % NB))
            _ws_epilogue(acc, bias_ptr, out_ptr, part_ptr, cnt_ptr, M, N, off_m, off_n, tile, pid_k, splits,
                         stride_om, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT, MMA_LAYOUT)

    @gluon.jit
    def _w4_wsp_kernel(x_desc, w_desc, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                       M, N, num_units, num_m, splits, T, stride_sg, stride_om, magic, zconst,
                       MAGIC: gl.constexpr, BASE: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr,
                       HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                       CHUNK: gl.constexpr, STAGES: gl.constexpr, NB: gl.constexpr, SPLIT: gl.constexpr,
                       DQ: gl.constexpr, NP: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """Persistent ``_w4_ws_kernel``: ``num_units`` = output tiles x ``splits`` of ``T`` K steps each; ``NP``
        (1 or 2) producer warpgroups."""
        dtype: gl.constexpr = x_desc.dtype
        x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty = _ws_rings(x_desc, w_desc, dtype, BLOCK_N, BLOCK_K,
                                                                        STAGES, NB)
        if NP == 1:
            gl.warp_specialize([
                (_wsp_consumer, (x_buf, b_buf, ready, empty, b_ready, b_empty, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                                 M, N, num_units, num_m, splits, T, stride_om,
                                 HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, NB, SPLIT, num_warps)),
                (_wsp_producer, (x_desc, w_desc, s_ptr, z_ptr, x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty,
                                 num_units, num_m, splits, T, stride_sg, magic, zconst, MAGIC, BASE, GROUP, HAS_ZP,
                                 BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, STAGES, NB, DQ, 1, 0)),
            ], [4], [PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_wsp_consumer, (x_buf, b_buf, ready, empty, b_ready, b_empty, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                                 M, N, num_units, num_m, splits, T, stride_om,
                                 HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, NB, SPLIT, num_warps)),
                (_wsp_producer, (x_desc, w_desc, s_ptr, z_ptr, x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty,
                                 num_units, num_m, splits, T, stride_sg, magic, zconst, MAGIC, BASE, GROUP, HAS_ZP,
                                 BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, STAGES, NB, DQ, 2, 0)),
                (_wsp_producer, (x_desc, w_desc, s_ptr, z_ptr, x_buf, p_buf, b_buf, ready, empty, b_ready, b_empty,
                                 num_units, num_m, splits, T, stride_sg, magic, zconst, MAGIC, BASE, GROUP, HAS_ZP,
                                 BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, STAGES, NB, DQ, 2, 1)),
            ], [4, 4], [PRODUCER_REGS, PRODUCER_REGS])


def w4_ws_launch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, out: torch.Tensor, part: torch.Tensor | None, cnt: torch.Tensor | None,
                 *, k: int, n: int, group: int, magic: int, base: float, block_m: int, block_n: int, block_k: int,
                 stages: int, nb: int, warps: int, splits: int, tiles_per_split: int, dq: int = 1,
                 programs: int = 0, producers: int = 1) -> None:
    """Launch ``_w4_ws_kernel``: ``warps // 4`` consumer warpgroups (64 rows each, ``block_m = 16 * warps``)
    plus one producer warpgroup that loads ``x`` and the packed codes by TMA into a ``stages``-deep ring and
    dequantizes into ``nb`` bf16/fp16 tiles (``dq=1``: packed PTX arithmetic on column pairs, ``dq=0``: the
    Gluon arithmetic of ``_dequant_tile``). ``programs > 0``: the persistent form on that many programs at most
    (``splits`` must divide the K steps: every unit has ``tiles_per_split`` of them), with ``producers`` (1 or
    2; 2 needs ``stages`` and ``nb`` even) producer warpgroups."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    m = x.shape[0]
    gdt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_m, block_k], gdt))
    w_desc = TensorDescriptor.from_tensor(weight, [block_k, block_n // 8],
                                          gl.NVMMASharedLayout.get_default_for([block_k, block_n // 8], gl.int32))
    num_m = (m + block_m - 1) // block_m
    grid = ((n // block_n) * num_m, splits)
    dummy = scales
    # Registers: the consumers get what the 24-register producer floor leaves of 64K over all the warps.
    maxnreg = min(240, 65536 // ((warps + 4 * producers) * 32) // 8 * 8)
    if programs:
        units = grid[0] * splits
        _w4_wsp_kernel[(min(units, programs),)](
            x_desc, w_desc, scales, zeros if zeros is not None else dummy, bias if bias is not None else dummy, out,
            part if part is not None else out, cnt if cnt is not None else out,
            m, n, units, num_m, splits, tiles_per_split, scales.stride(0), out.stride(0), magic, _ZCONST[x.dtype],
            MAGIC=magic, BASE=base, GROUP=group, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, CHUNK=16 if block_n >= 256 else 32, STAGES=stages,
            NB=nb, SPLIT=splits > 1, DQ=dq, NP=producers, PRODUCER_REGS=112 if producers == 1 else 80,
            num_warps=warps, maxnreg=maxnreg)
        return
    _w4_ws_kernel[grid](
        x_desc, w_desc, scales, zeros if zeros is not None else dummy, bias if bias is not None else dummy, out,
        part if part is not None else out, cnt if cnt is not None else out,
        m, n, k, tiles_per_split, splits, scales.stride(0), out.stride(0), magic, _ZCONST[x.dtype],
        MAGIC=magic, BASE=base, GROUP=group, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, CHUNK=16 if block_n >= 256 else 32, STAGES=stages,
        NB=nb, SPLIT=splits > 1, DQ=dq, PRODUCER_REGS=112, num_warps=warps, maxnreg=maxnreg)


#: ``BASE + 8`` twice as one word (the zero point of symmetric weights, for ``_pairs_dequant``)
_ZCONST = {torch.bfloat16: 0x43084308, torch.float16: 0x64086408}
