"""int4 decode GEMV (1..4 rows) in Gluon: the packed weight streams through a ``cp.async`` ring.

Why: the Triton GEMV (``quant_gemv._gemv_int4_kernel``) issues one group's loads, waits, computes, then the
next group's loads, so at batch 1 an H200 sees ~1.1-1.6 TB/s of its ~4.8. Here each program owns
``BLOCK_W = 32 * num_warps`` packed columns (8 outputs a thread, all ``KS`` rows of a step in-thread: no
cross-thread sums) and a split of K, and ``cp.async`` copies ``STAGES - 1`` steps of ``KS`` rows ahead into
shared memory (16-byte copies; one barrier a step publishes them and ``x``'s slice).

Arithmetic as the Triton GEMV: a nibble moved to mantissa bits 16..19 of 1.0 is ``f = 1 + q / 128`` with a
shift and one mask-or; per step ``G_j = sum_k x_k f_j`` (one FMA per weight and row) and ``X = sum_k x_k``,
then ``acc += a G + b X`` with ``a = 128 s`` and ``b = -s (128 + z)``, which is ``sum_k x_k s (q - z)``.
Split-K as everywhere here: fp32 partials and an arrival counter, the last program adds them in split order.

Version 2 (``_gemv_w4v2_kernel``): a thread owns a few adjacent words on a few adjacent K rows of each small
step and reads back exactly what it loaded (a cp.async ring, or plain loads a few steps ahead into registers), so
steps are a few KB and many programs fit an SM; the four shared shifts of the Triton GEMV put each nibble at
mantissa bits 12..15 or 16..19 (one mask-or and one FMA a weight).

Gluon has no CPU interpreter: on the CPU these kernels are compiled for sm_90 by the tests; their results are
checked on the GPU (``benchmarks/gpu/check_w4_gemv.py``) against float64 dequantize + matmul.
"""
from __future__ import annotations

import torch

from aphrodite.kernels.w4_wgmma import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

__all__ = ["gemv_fp8_launch", "gemv_fp8_supported", "gemv_w4_launch", "gemv_w4_supported", "gemv_w4v2_launch",
           "gemv_w4v2_supported"]


if HAS_GLUON:

    @gluon.jit
    def _plane(p, x2, j: gl.constexpr, one):
        """sum_k x_k f_j[.., k, w] for nibble j of every word (``p [WK, KS, BW]``, the sum over KS in-thread):
        f = 1 + q/128 (nibble at bits 16..19 of 1.0)."""
        if j < 4:
            t = p << (16 - 4 * j)
        elif j == 4:
            t = p
        else:
            t = p >> (4 * j - 16)
        f = ((t & 0xF0000) | one).to(gl.float32, bitcast=True)
        return gl.sum(f * x2, axis=1)

    @gluon.jit
    def _cols(g0, g1, g2, g3, g4, g5, g6, g7):
        """Eight ``[WK, BW]`` planes -> ``[WK, BW, 8]`` in output order (plane j holds column INT4_ORDER[j])."""
        q0 = gl.join(g0, g4)        # columns 0, 1
        q1 = gl.join(g1, g5)        # 2, 3
        q2 = gl.join(g2, g6)        # 4, 5
        q3 = gl.join(g3, g7)        # 6, 7
        r0 = gl.permute(gl.join(q0, q1), (0, 1, 3, 2))          # [WK, BW, h, e] -> column 2h + e
        r1 = gl.permute(gl.join(q2, q3), (0, 1, 3, 2))
        full = gl.permute(gl.join(r0, r1), (0, 1, 4, 2, 3))      # [WK, BW, t, h, e] -> 4t + 2h + e
        return gl.reshape(full, [full.shape[0], full.shape[1], 8])

    @gluon.jit
    def _row_step(p, x_row, s, zb, one, O_LAYOUT: gl.constexpr):
        """One step's contribution for one row of x (``[WK, KS]``, each warp row its K part): ``a G + b X`` as a
        ``[WK, BW, 8]`` tile of per-warp partial sums."""
        xf = x_row.to(gl.float32)
        x2 = gl.expand_dims(xf, 2)
        g = _cols(_plane(p, x2, 0, one), _plane(p, x2, 1, one), _plane(p, x2, 2, one), _plane(p, x2, 3, one),
                  _plane(p, x2, 4, one), _plane(p, x2, 5, one), _plane(p, x2, 6, one), _plane(p, x2, 7, one))
        g = gl.convert_layout(g, O_LAYOUT)
        xs = gl.convert_layout(gl.sum(xf, axis=1), gl.SliceLayout(1, gl.SliceLayout(2, O_LAYOUT)))
        xs3 = gl.expand_dims(gl.expand_dims(xs, 1), 2)
        return gl.expand_dims(s * 128.0, 0) * g - gl.expand_dims(s * zb, 0) * xs3

    @gluon.jit
    def _issue(w_ptrs, x_ptrs, s_ptrs, z_ptrs, p_buf, x_buf, s_buf, z_buf, slot, st, n_steps, k_lo, stride_wk,
               stride_xm, stride_sg, ROWS: gl.constexpr, KS: gl.constexpr, GROUP: gl.constexpr,
               HAS_ZP: gl.constexpr):
        """Step ``st`` (``KS`` = all rows of a step) into ring slot ``slot``: one commit group."""
        ok = st < n_steps
        k0 = k_lo + st * KS
        cp.async_copy_global_to_shared(p_buf.index(slot), w_ptrs + k0 * stride_wk, mask=ok)
        for r in gl.static_range(ROWS):
            cp.async_copy_global_to_shared(x_buf.index(slot * ROWS + r), x_ptrs + r * stride_xm + k0, mask=ok)
        g = (k0 // GROUP) * stride_sg
        cp.async_copy_global_to_shared(s_buf.index(slot), s_ptrs + g, mask=ok)
        if HAS_ZP:
            cp.async_copy_global_to_shared(z_buf.index(slot), z_ptrs + g, mask=ok)
        cp.commit_group()

    @gluon.jit
    def _gemv_w4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                        M, N, steps_per_split, total_steps, num_splits, one,
                        stride_xm, stride_wk, stride_sg, stride_om,
                        ROWS: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr, HAS_BIAS: gl.constexpr,
                        KS: gl.constexpr, WK: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
                        num_warps: gl.constexpr):
        WW: gl.constexpr = num_warps // WK
        BW: gl.constexpr = 32 * WW
        KT: gl.constexpr = KS * WK          # rows a step: WK groups of warps take KS rows each
        dtype: gl.constexpr = s_ptr.dtype.element_ty
        # A thread owns one packed column (8 outputs) and KS rows of a step: the K sums stay in-thread; the WK
        # warp rows keep separate sums, added once at the end.
        P_LAYOUT: gl.constexpr = gl.BlockedLayout([1, KS, 1], [1, 1, 32], [WK, 1, WW], [1, 2, 0])
        # ... but the copies move 16-byte rows of 4 words (the barrier that publishes x publishes them too).
        TW: gl.constexpr = 8 * num_warps if num_warps < 4 else 32
        PC_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TW, TW], [num_warps, 1], [1, 0])
        O_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 32, 1], [WK, WW, 1], [2, 1, 0])
        S_LAYOUT: gl.constexpr = gl.SliceLayout(0, O_LAYOUT)
        SC_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [num_warps, 1], [1, 0])
        XC_LAYOUT: gl.constexpr = gl.BlockedLayout([8], [32], [num_warps], [0])
        FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        FLAT1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

        pid_w = gl.program_id(0)
        pid_k = gl.program_id(1)
        st_lo = pid_k * steps_per_split
        n_steps = gl.minimum(steps_per_split, total_steps - st_lo)
        k_lo = st_lo * KT               # a step is KT = KS * WK rows (WK warp rows of KS rows each)

        pk = gl.arange(0, KT, layout=gl.SliceLayout(1, PC_LAYOUT))
        pw = pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(0, PC_LAYOUT))
        w_ptrs = w_ptr + gl.expand_dims(pk.to(gl.int64) * stride_wk, 1) + gl.expand_dims(pw, 0)
        x_ptrs = x_ptr + gl.arange(0, KT, layout=XC_LAYOUT)
        sw = pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(1, SC_LAYOUT))
        sc = gl.arange(0, 8, layout=gl.SliceLayout(0, SC_LAYOUT))
        s_ptrs = s_ptr + gl.expand_dims(sw * 8, 1) + gl.expand_dims(sc, 0)   # [BW, 8] output features
        z_ptrs = z_ptr + gl.expand_dims(sw * 8, 1) + gl.expand_dims(sc, 0)

        p_buf = gl.allocate_shared_memory(gl.int32, [STAGES, KT, BW], FLAT)
        x_buf = gl.allocate_shared_memory(dtype, [STAGES * ROWS, KT], FLAT1)
        s_buf = gl.allocate_shared_memory(dtype, [STAGES, BW, 8], FLAT)
        if HAS_ZP:
            z_buf = gl.allocate_shared_memory(dtype, [STAGES, BW, 8], FLAT)
        else:
            z_buf = s_buf

        for i in gl.static_range(STAGES - 1):
            _issue(w_ptrs, x_ptrs, s_ptrs, z_ptrs, p_buf, x_buf, s_buf, z_buf, i, i, n_steps, k_lo, stride_wk,
                   stride_xm, stride_sg, ROWS, KT, GROUP, HAS_ZP)

        acc0 = gl.zeros([WK, BW, 8], dtype=gl.float32, layout=O_LAYOUT)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        slot = 0
        for st in range(0, n_steps):
            cp.wait_group(STAGES - 2)
            gl.thread_barrier()          # x's slice was copied by other threads; slot - 1 is free for everyone
            nxt = slot + STAGES - 1
            nxt = gl.where(nxt >= STAGES, nxt - STAGES, nxt)
            _issue(w_ptrs, x_ptrs, s_ptrs, z_ptrs, p_buf, x_buf, s_buf, z_buf, nxt, st + STAGES - 1, n_steps, k_lo,
                   stride_wk, stride_xm, stride_sg, ROWS, KT, GROUP, HAS_ZP)
            p = p_buf.index(slot).reshape([WK, KS, BW]).load(P_LAYOUT)
            s = s_buf.index(slot).load(S_LAYOUT).to(gl.float32)
            if HAS_ZP:
                zb = z_buf.index(slot).load(S_LAYOUT).to(gl.float32) + 128.0
            else:
                zb = gl.full([BW, 8], 136.0, gl.float32, S_LAYOUT)
            XR_LAYOUT: gl.constexpr = gl.SliceLayout(2, P_LAYOUT)
            acc0 += _row_step(p, x_buf.index(slot * ROWS).reshape([WK, KS]).load(XR_LAYOUT), s, zb, one, O_LAYOUT)
            if ROWS > 1:
                acc1 += _row_step(p, x_buf.index(slot * ROWS + 1).reshape([WK, KS]).load(XR_LAYOUT), s, zb, one,
                                  O_LAYOUT)
            if ROWS > 2:
                acc2 += _row_step(p, x_buf.index(slot * ROWS + 2).reshape([WK, KS]).load(XR_LAYOUT), s, zb, one,
                                  O_LAYOUT)
            if ROWS > 3:
                acc3 += _row_step(p, x_buf.index(slot * ROWS + 3).reshape([WK, KS]).load(XR_LAYOUT), s, zb, one,
                                  O_LAYOUT)
            slot = gl.where(slot + 1 >= STAGES, 0, slot + 1)
        cp.wait_group(0)

        ow = pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(1, S_LAYOUT))
        oc = gl.arange(0, 8, layout=gl.SliceLayout(0, S_LAYOUT))
        cols = gl.expand_dims(ow * 8, 1) + gl.expand_dims(oc, 0)             # [BW, 8] output features
        ok = gl.expand_dims(ow * 8 < N, 1)
        _store_rows(acc0, acc1, acc2, acc3, part_ptr, cnt_ptr, bias_ptr, out_ptr, cols, ok, pid_w, pid_k, M, N,
                    num_splits, stride_om, ROWS, HAS_BIAS, SPLIT, S_LAYOUT)   # WK warp rows summed (shared memory)


    @gluon.jit
    def _w4_issue(w_buf, w_ptrs, slot, st, n_steps, k_lo, stride_wk, KS: gl.constexpr):
        """Step ``st`` of ``KS`` packed rows into ring slot ``slot``: one commit group (16/8/4-byte copies). Steps
        past the split re-read its last step (cache hits, never used): no masks in the loop."""
        st = gl.minimum(st, n_steps - 1)
        cp.async_copy_global_to_shared(w_buf.index(slot), w_ptrs + (k_lo + st * KS) * stride_wk)
        cp.commit_group()

    @gluon.jit
    def _w4_load(w_ptrs, st, n_steps, k_lo, stride_wk, KS: gl.constexpr):
        """Step ``st``'s packed words into registers (past the split: its last step again, never used)."""
        return gl.load(w_ptrs + (k_lo + gl.minimum(st, n_steps - 1) * KS) * stride_wk)

    @gluon.jit
    def _w4_x(x_ptr, rows, k0, ROW: gl.constexpr, ROWS: gl.constexpr, stride_xm, X_L: gl.constexpr):
        """Row ``ROW`` of x at K rows ``k0 + rows`` (zeros for a row past ``ROWS``)."""
        if ROW < ROWS:
            return gl.load(x_ptr + ROW * stride_xm + k0 + rows).to(gl.float32)
        else:
            return gl.zeros(rows.shape, gl.float32, X_L)

    @gluon.jit
    def _bcast4(v):
        """``[8]`` per-output constants -> ``[1, 1, 1, 8]``."""
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 0), 0)

    @gluon.jit
    def _bx(x):
        """x ``[KO, R]`` -> ``[KO, R, 1, 1]``."""
        return gl.expand_dims(gl.expand_dims(x, 2), 3)

    @gluon.jit
    def _bxs(xs, G_L: gl.constexpr):
        """The group's x sums ``[KO, R]`` -> ``[KO, 1, 1]`` beside the ``[KO, BW, 8]`` sums."""
        xk = gl.convert_layout(gl.sum(xs, axis=1), gl.SliceLayout(1, gl.SliceLayout(2, G_L)))
        return gl.expand_dims(gl.expand_dims(xk, 1), 2)

    @gluon.jit
    def _gemv_w4v2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                          M, N, groups_per_split, num_groups, num_splits, one,
                          stride_xm, stride_wk, stride_sg, stride_om,
                          ROWS: gl.constexpr, GROUP: gl.constexpr, HAS_ZP: gl.constexpr, HAS_BIAS: gl.constexpr,
                          R: gl.constexpr, V: gl.constexpr, TK: gl.constexpr, WK: gl.constexpr,
                          STAGES: gl.constexpr, RING: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
        """int4 GEMV, version 2: the thread that copies a packed word is the one that reads it back (no
        cross-thread data in the loop, so a step is small and many programs fit an SM). A thread owns ``V``
        adjacent words (8 V outputs) on ``R`` adjacent K rows of a step; ``TK`` lanes and ``WK`` warps stack
        along K (``KO = TK WK`` row blocks, ``KS = KO R`` rows a step), the rest of the warps and lanes along the
        words (``BW`` a program). Per group (``GROUP / KS`` steps) the thread keeps ``G = sum_k x f`` and
        ``X = sum_k x`` for its outputs (f = 1 + q/128: the nibble moved to mantissa bits 16..19, one shift
        and one mask-or), then ``acc += 128 s G - s (128 + z) X``; the ``KO`` partial sums are added once at the
        end. Split-K by whole groups with the arrival counter (the last program adds the partials in order).
        ``RING``: the words stream through a ``STAGES``-deep cp.async ring in shared memory; else they are loaded
        into registers ``STAGES - 1`` (1..3) steps ahead (no shared memory, no barriers)."""
        WW: gl.constexpr = num_warps // WK
        LW: gl.constexpr = 32 // TK
        BW: gl.constexpr = V * LW * WW
        KO: gl.constexpr = TK * WK
        KS: gl.constexpr = KO * R
        SPG: gl.constexpr = GROUP // KS
        UNROLL: gl.constexpr = 2 if SPG % 2 == 0 else 1          # steps a loop trip (register rotation unrolled)
        # [KO, R, BW, 8]: the nibbles of a thread's words stay in its registers, in output order on the last axis
        L4: gl.constexpr = gl.BlockedLayout([1, R, V, 8], [TK, 1, LW, 1], [WK, 1, WW, 1], [3, 2, 1, 0])
        P_L: gl.constexpr = gl.SliceLayout(3, L4)                    # [KO, R, BW] packed words
        X_L: gl.constexpr = gl.SliceLayout(2, P_L)                   # [KO, R] x
        G_L: gl.constexpr = gl.SliceLayout(1, L4)                    # [KO, BW, 8] sums
        S_L: gl.constexpr = gl.SliceLayout(0, G_L)                   # [BW, 8] scales, outputs
        C_L: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L4)))   # [8]
        SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])

        pid_w = gl.program_id(0)
        pid_k = gl.program_id(1)
        g_lo = pid_k * groups_per_split
        n_groups = gl.minimum(groups_per_split, num_groups - g_lo)
        n_steps = n_groups * SPG
        k_lo = g_lo * GROUP

        ko = gl.arange(0, KO, layout=gl.SliceLayout(1, X_L))
        rr = gl.arange(0, R, layout=gl.SliceLayout(0, X_L))
        rows = gl.expand_dims(ko * R, 1) + gl.expand_dims(rr, 0)                  # [KO, R] step rows
        ww = pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(0, gl.SliceLayout(1, P_L)))
        w_ptrs = (w_ptr + gl.expand_dims(rows.to(gl.int64) * stride_wk, 2)
                  + gl.expand_dims(gl.expand_dims(ww, 0), 1))                      # [KO, R, BW]
        # Output c of a word is nibble pos = c // 2 + 4 (c % 2) (INT4_ORDER). Like the Triton GEMV, four shifts
        # (p << 12, p << 4, p, p >> 8, p >> 16; constants per register after unrolling) put every nibble at
        # mantissa bits 12..15 (f = 1 + q/2048: even pos but 4) or 16..19 (f = 1 + q/128: pos 1, 4, 6).
        c = gl.arange(0, 8, layout=C_L)
        pos = c // 2 + 4 * (c % 2)
        high = (pos == 1) | (pos == 4) | (pos == 6)
        sh = gl.where(pos < 2, 12, gl.where(pos == 2, 4, gl.where(pos < 5, 0, gl.where(pos < 7, -8, -16))))
        lsh = _bcast4(gl.maximum(sh, 0))
        rsh = _bcast4(gl.maximum(-sh, 0))
        msk = _bcast4(gl.where(high, 0xF0000, 0xF000))
        mult = gl.expand_dims(gl.convert_layout(gl.where(high, 128.0, 2048.0), gl.SliceLayout(0, S_L)), 0)   # [1, 8]
        sw = pid_w * BW + gl.arange(0, BW, layout=gl.SliceLayout(1, S_L))
        cols = gl.expand_dims(sw * 8, 1) + gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, S_L)), 0)

        if RING:
            w_buf = gl.allocate_shared_memory(gl.int32, [STAGES, KO, R, BW], SMEM)
            for i in gl.static_range(STAGES - 1):
                _w4_issue(w_buf, w_ptrs, i, i, n_steps, k_lo, stride_wk, KS)
            q0 = gl.zeros([KO, R, BW], gl.int32, P_L)
            q1 = q0
            q2 = q0
        else:
            q0 = _w4_load(w_ptrs, 0, n_steps, k_lo, stride_wk, KS)
            q1 = q0
            q2 = q0
            if STAGES > 2:
                q1 = _w4_load(w_ptrs, 1, n_steps, k_lo, stride_wk, KS)
            if STAGES > 3:
                q2 = _w4_load(w_ptrs, 2, n_steps, k_lo, stride_wk, KS)

        acc0 = gl.zeros([KO, BW, 8], dtype=gl.float32, layout=G_L)
        zero4 = gl.zeros([KO, R, BW, 8], dtype=gl.float32, layout=L4)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        xn0 = _w4_x(x_ptr, rows, k_lo, 0, ROWS, stride_xm, X_L)
        xn1 = _w4_x(x_ptr, rows, k_lo, 1, ROWS, stride_xm, X_L)
        xn2 = _w4_x(x_ptr, rows, k_lo, 2, ROWS, stride_xm, X_L)
        xn3 = _w4_x(x_ptr, rows, k_lo, 3, ROWS, stride_xm, X_L)
        slot = 0
        for gi in range(0, n_groups):
            g_off = (g_lo + gi) * stride_sg
            s = gl.load(s_ptr + g_off + cols).to(gl.float32)
            if HAS_ZP:
                zb = gl.load(z_ptr + g_off + cols).to(gl.float32)
            else:
                zb = gl.full([BW, 8], 8.0, gl.float32, S_L)
            g0 = zero4              # per-element sums (FMAs; the in-thread rows are added at the group's end)
            g1 = g0
            g2 = g0
            g3 = g0
            xs0 = gl.zeros([KO, R], dtype=gl.float32, layout=X_L)
            xs1 = xs0
            xs2 = xs0
            xs3 = xs0
            for j0 in range(0, SPG, UNROLL):
                for j1 in gl.static_range(UNROLL):
                    st = gi * SPG + j0 + j1
                    if RING:
                        cp.wait_group(STAGES - 2)
                        nxt = slot + STAGES - 1
                        nxt = gl.where(nxt >= STAGES, nxt - STAGES, nxt)
                        _w4_issue(w_buf, w_ptrs, nxt, st + STAGES - 1, n_steps, k_lo, stride_wk, KS)
                        p = gl.expand_dims(w_buf.index(slot).load(P_L), 3)
                        slot = gl.where(slot + 1 >= STAGES, 0, slot + 1)
                    else:                     # registers: step st was loaded STAGES - 1 steps ago
                        p = gl.expand_dims(q0, 3)
                        if STAGES == 2:
                            q0 = _w4_load(w_ptrs, st + 1, n_steps, k_lo, stride_wk, KS)
                        elif STAGES == 3:
                            q0 = q1
                            q1 = _w4_load(w_ptrs, st + 2, n_steps, k_lo, stride_wk, KS)
                        else:
                            q0 = q1
                            q1 = q2
                            q2 = _w4_load(w_ptrs, st + 3, n_steps, k_lo, stride_wk, KS)
                    f = ((((p << lsh) >> rsh) & msk) | one).to(gl.float32, bitcast=True)    # [KO, R, BW, 8]
                    x0 = xn0
                    x1 = xn1
                    x2 = xn2
                    x3 = xn3
                    k1 = k_lo + gl.minimum(st + 1, n_steps - 1) * KS       # past the split: the last step again
                    xn0 = _w4_x(x_ptr, rows, k1, 0, ROWS, stride_xm, X_L)
                    g0 += f * _bx(x0)
                    xs0 += x0
                    if ROWS > 1:
                        xn1 = _w4_x(x_ptr, rows, k1, 1, ROWS, stride_xm, X_L)
                        g1 += f * _bx(x1)
                        xs1 += x1
                    if ROWS > 2:
                        xn2 = _w4_x(x_ptr, rows, k1, 2, ROWS, stride_xm, X_L)
                        g2 += f * _bx(x2)
                        xs2 += x2
                    if ROWS > 3:
                        xn3 = _w4_x(x_ptr, rows, k1, 3, ROWS, stride_xm, X_L)
                        g3 += f * _bx(x3)
                        xs3 += x3
            a = gl.expand_dims(s * mult, 0)                 # acc += a G + b X = s sum x (q - z)
            b = gl.expand_dims(s * (zb + mult), 0)
            acc0 += a * gl.sum(g0, axis=1) - b * _bxs(xs0, G_L)
            if ROWS > 1:
                acc1 += a * gl.sum(g1, axis=1) - b * _bxs(xs1, G_L)
            if ROWS > 2:
                acc2 += a * gl.sum(g2, axis=1) - b * _bxs(xs2, G_L)
            if ROWS > 3:
                acc3 += a * gl.sum(g3, axis=1) - b * _bxs(xs3, G_L)
        if RING:
            cp.wait_group(0)

        ok = gl.expand_dims(sw * 8 < N, 1)
        _store_rows(acc0, acc1, acc2, acc3, part_ptr, cnt_ptr, bias_ptr, out_ptr, cols, ok, pid_w, pid_k, M, N,
                    num_splits, stride_om, ROWS, HAS_BIAS, SPLIT, S_L)        # KO row blocks summed (lanes, warps)

    @gluon.jit
    def _store_rows(acc0, acc1, acc2, acc3, part_ptr, cnt_ptr, bias_ptr, out_ptr, cols, ok, pid_w, pid_k, M, N,
                    num_splits, stride_om, ROWS: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr,
                    S_L: gl.constexpr):
        """Each row's ``[K parts, BW, 8]`` sums added over the K parts: the output (+ bias), or this split's fp32
        partial and then ``_split_finish``."""
        for r in gl.static_range(ROWS):
            if r == 0:
                acc = gl.sum(acc0, axis=0)
            elif r == 1:
                acc = gl.sum(acc1, axis=0)
            elif r == 2:
                acc = gl.sum(acc2, axis=0)
            else:
                acc = gl.sum(acc3, axis=0)
            if SPLIT:
                gl.store(part_ptr + (pid_k * M + r).to(gl.int64) * N + cols, acc, mask=ok)
            else:
                if HAS_BIAS:
                    acc += gl.load(bias_ptr + cols, mask=ok, other=0.0).to(gl.float32)
                gl.store(out_ptr + r * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)
        if SPLIT:
            _split_finish(part_ptr, cnt_ptr, bias_ptr, out_ptr, cols, ok, pid_w, M, N, num_splits, stride_om,
                          ROWS, HAS_BIAS, S_L)

    @gluon.jit
    def _split_finish(part_ptr, cnt_ptr, bias_ptr, out_ptr, cols, ok, pid_w, M, N, num_splits, stride_om,
                      ROWS: gl.constexpr, HAS_BIAS: gl.constexpr, S_L: gl.constexpr):
        """Split-K: count this program's arrival; the last one for the column block adds every split's fp32
        partial in split order (deterministic), adds the bias and writes the output, and re-arms the counter."""
        gl.thread_barrier()
        cnt = cnt_ptr + pid_w
        done = gl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            gl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
            for r in gl.static_range(ROWS):
                total = gl.zeros(cols.shape, dtype=gl.float32, layout=S_L)
                for sp0 in range(0, num_splits, 8):        # eight loads in flight; fixed order
                    for u in gl.static_range(8):
                        sp = sp0 + u
                        total += gl.load(part_ptr + (sp * M + r).to(gl.int64) * N + cols,
                                         mask=ok & (sp < num_splits), other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += gl.load(bias_ptr + cols, mask=ok, other=0.0).to(gl.float32)
                gl.store(out_ptr + r * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=ok)

    @gluon.jit
    def _gemv_fp8_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_om,
                         ROWS: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         num_warps: gl.constexpr):
        """FP8 ``[N, K]`` weight with one scale per output: a program owns ``BLOCK_N`` rows of W and streams
        them along K in steps of 512 (a warp spans a step, 16 bytes a thread) through a cp.async ring; a
        thread reads back exactly the bytes it copied, so the loop has no barrier. ``x``'s next step is
        loaded into registers one step ahead. fp32 FMAs; one reduction across the warp at the end."""
        KS: gl.constexpr = 512
        dtype: gl.constexpr = out_ptr.dtype.element_ty
        W_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 16], [1, 32], [num_warps, 1], [1, 0])
        XL: gl.constexpr = gl.SliceLayout(0, W_LAYOUT)
        NL: gl.constexpr = gl.SliceLayout(1, W_LAYOUT)
        FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        pid = gl.program_id(0)
        rows = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=NL)
        kk = gl.arange(0, KS, layout=XL)
        w_ptrs = w_ptr + gl.expand_dims(rows.to(gl.int64) * stride_wn, 1) + gl.expand_dims(kk, 0)
        n_steps = K // KS
        w_buf = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [STAGES, BLOCK_N, KS], FLAT)
        for i in gl.static_range(STAGES - 1):
            cp.async_copy_global_to_shared(w_buf.index(i), w_ptrs + i * KS, mask=i < n_steps)
            cp.commit_group()
        acc0 = gl.zeros([BLOCK_N, KS], dtype=gl.float32, layout=W_LAYOUT)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        x0 = gl.load(x_ptr + kk)
        if ROWS > 1:
            x1 = gl.load(x_ptr + stride_xm + kk)
        if ROWS > 2:
            x2 = gl.load(x_ptr + 2 * stride_xm + kk)
        if ROWS > 3:
            x3 = gl.load(x_ptr + 3 * stride_xm + kk)
        slot = 0
        for st in range(0, n_steps):
            cp.wait_group(STAGES - 2)
            nxt = slot + STAGES - 1
            nxt = gl.where(nxt >= STAGES, nxt - STAGES, nxt)
            ahead = st + STAGES - 1
            cp.async_copy_global_to_shared(w_buf.index(nxt), w_ptrs + ahead * KS, mask=ahead < n_steps)
            cp.commit_group()
            w = w_buf.index(slot).load(W_LAYOUT).to(gl.float32)
            more = st + 1 < n_steps
            k1 = (st + 1) * KS + kk
            acc0 += w * gl.expand_dims(x0.to(gl.float32), 0)
            x0 = gl.load(x_ptr + k1, mask=more, other=0.0)
            if ROWS > 1:
                acc1 += w * gl.expand_dims(x1.to(gl.float32), 0)
                x1 = gl.load(x_ptr + stride_xm + k1, mask=more, other=0.0)
            if ROWS > 2:
                acc2 += w * gl.expand_dims(x2.to(gl.float32), 0)
                x2 = gl.load(x_ptr + 2 * stride_xm + k1, mask=more, other=0.0)
            if ROWS > 3:
                acc3 += w * gl.expand_dims(x3.to(gl.float32), 0)
                x3 = gl.load(x_ptr + 3 * stride_xm + k1, mask=more, other=0.0)
            slot = gl.where(slot + 1 >= STAGES, 0, slot + 1)
        cp.wait_group(0)
        scale = gl.load(s_ptr + rows).to(gl.float32)
        for r in gl.static_range(ROWS):
            if r == 0:
                acc = acc0
            elif r == 1:
                acc = acc1
            elif r == 2:
                acc = acc2
            else:
                acc = acc3
            res = gl.sum(acc, axis=1) * scale
            if HAS_BIAS:
                res += gl.load(bias_ptr + rows).to(gl.float32)
            gl.store(out_ptr + r * stride_om + rows, res.to(dtype))


def gemv_w4_supported(n: int, k: int, group: int, ks: int, warps: int, wk: int = 1) -> bool:
    """Shapes ``_gemv_w4_kernel`` takes: ``wk`` rows of warps splitting each step's K, whole
    ``32 * warps / wk``-word column blocks (no column masks on the copies) and steps of ``ks * wk`` rows inside one
    group."""
    return (warps % wk == 0 and n % (256 * (warps // wk)) == 0 and group % (ks * wk) == 0
            and k % group == 0)


def gemv_w4_launch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bias: torch.Tensor | None, out: torch.Tensor, *, n: int, group: int, ks: int, stages: int,
                   warps: int, target: int, num_sms: int, counters, max_splits: int = 16, wk: int = 1) -> None:
    """Launch ``_gemv_w4_kernel`` for ``x [M <= 4, K]`` (``gemv_w4_supported`` shapes); split-K by whole steps
    to reach ``target`` programs per SM, at most ``max_splits`` (the last program of a column block reads
    every split's partial)."""
    m, k = x.shape
    bw = 32 * (warps // wk)
    programs = n // 8 // bw
    total_steps = k // (ks * wk)
    want = max(1, min(total_steps, max_splits, -(-target * num_sms // programs)))
    per = -(-total_steps // want)
    splits = -(-total_steps // per)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    cnt = counters(x.device, programs) if splits > 1 else out
    dummy = scales
    _gemv_w4_kernel[(programs, splits)](
        x, weight, scales, zeros if zeros is not None else dummy, bias if bias is not None else dummy, out, part,
        cnt, m, n, per, total_steps, splits, 0x3F800000, x.stride(0), weight.stride(0), scales.stride(0),
        out.stride(0), ROWS=m, GROUP=group, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None, KS=ks, WK=wk,
        STAGES=stages, SPLIT=splits > 1, num_warps=warps)


def gemv_w4v2_supported(n: int, k: int, group: int, r: int, v: int, tk: int, warps: int, wk: int) -> bool:
    """Shapes ``_gemv_w4v2_kernel`` takes: whole column blocks of ``v * 32 / tk * warps / wk`` words (no column
    masks on the copies) and steps of ``r * tk * wk`` rows that tile a group."""
    if warps % wk or 32 % tk or v not in (1, 2, 4):
        return False
    bw = v * (32 // tk) * (warps // wk)
    ks = r * tk * wk
    return n % (8 * bw) == 0 and group % ks == 0 and k % group == 0


def gemv_w4v2_launch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bias: torch.Tensor | None, out: torch.Tensor, *, n: int, group: int, r: int, v: int, tk: int,
                     wk: int, stages: int, warps: int, target: int, num_sms: int, counters, splits: int = 0,
                     max_splits: int = 64, ring: bool = True, maxnreg: int = 0) -> None:
    """Launch ``_gemv_w4v2_kernel`` for ``x [M <= 4, K]`` (``gemv_w4v2_supported`` shapes); split-K by whole
    groups to reach ``target`` programs per SM (or ``splits``), at most ``max_splits``."""
    m, k = x.shape
    bw = v * (32 // tk) * (warps // wk)
    programs = n // 8 // bw
    num_groups = k // group
    want = splits or max(1, min(max_splits, -(-target * num_sms // programs)))
    per = -(-num_groups // min(want, num_groups))
    splits = -(-num_groups // per)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    cnt = counters(x.device, programs) if splits > 1 else out
    _gemv_w4v2_kernel[(programs, splits)](
        x, weight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, part,
        cnt, m, n, per, num_groups, splits, 0x3F800000, x.stride(0), weight.stride(0), scales.stride(0),
        out.stride(0), ROWS=m, GROUP=group, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None, R=r, V=v, TK=tk,
        WK=wk, STAGES=stages, RING=ring, SPLIT=splits > 1, num_warps=warps,
        **({"maxnreg": maxnreg} if maxnreg else {}))


def gemv_fp8_supported(n: int, k: int, block_n: int, warps: int) -> bool:
    """Shapes ``_gemv_fp8_kernel`` takes: whole ``block_n``-row programs (split over the warps) and K in steps
    of 512."""
    return n % block_n == 0 and block_n % warps == 0 and k % 512 == 0


def gemv_fp8_launch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    out: torch.Tensor, *, block_n: int, stages: int, warps: int) -> None:
    """Launch ``_gemv_fp8_kernel``: ``weight [N, K]`` fp8 (K contiguous), ``scales [N]`` fp32 per output."""
    m, k = x.shape
    n = weight.shape[0]
    _gemv_fp8_kernel[(n // block_n,)](
        x, weight, scales, bias if bias is not None else scales, out, n, k, x.stride(0), weight.stride(0),
        out.stride(0), ROWS=m, HAS_BIAS=bias is not None, BLOCK_N=block_n, STAGES=stages, num_warps=warps)
