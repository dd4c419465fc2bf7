"""Fused temperature + min-p + inverse-CDF draw: the sampler's common case in one kernel (three at small batch).

The seed's ``temperature=1.1, min_p=0.1`` through separate PyTorch ops reads and writes the
[rows, vocab] logits about ten times (scale, softmax, max, mask, softmax, cumsum, search); here
one program per row reads its logits twice and writes one token id:
pass 1 the max (and argmax), pass 2 the kept mass of each block of BLOCK columns (min-p keeps
(x - max) / T >= log(min_p)), then the block where the running mass passes u * Z (Z: their sum) and
the first token inside it whose running mass does. A row with temperature <= 0 is greedy.

With few rows one program per row leaves most SMs idle while it walks a 128k-256k vocabulary (an
estimated ~100-200 us at batch 1, 2-3% of a latency-1 decode step), so there the blocks are spread over
programs: launch A takes each block's max, launch B each block's kept mass at the row's max, launch C
the draw from those sums. Both paths run the same device functions on the same blocks, so they add the
same float32 numbers in the same order and draw the same token: a seeded request's draw does not depend
on the batch beside it.
"""
from __future__ import annotations

import math

import torch

from aphrodite.kernels.triton_utils import HAS_TRITON, DeviceFunction, LazyKernel, cdiv, next_pow2, tl, use_triton

__all__ = ["apply_bitmask_", "apply_bitmask_ref", "row_stats", "row_stats_ref", "sample_temperature_min_p",
           "sample_temperature_min_p_ref"]


def sample_temperature_min_p_ref(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor | None,
                                 uniforms: torch.Tensor) -> torch.Tensor:
    """The same draw with PyTorch ops (the CPU path and the test oracle)."""
    x = logits.float()
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()[:, None]
    m = x.max(dim=-1, keepdim=True).values
    s = (x - m) / t
    p = torch.exp(s)
    if min_p is not None:
        log_mp = torch.where(min_p > 0, torch.log(min_p.float().clamp(min=1e-30)),
                             torch.full_like(min_p.float(), -math.inf))[:, None]
        p = torch.where(s >= log_mp, p, torch.zeros_like(p))
    c = torch.cumsum(p, dim=-1)
    target = uniforms.float()[:, None] * c[:, -1:]
    idx = torch.searchsorted(c, target, right=True).squeeze(1)
    greedy = x.argmax(dim=-1)
    idx = torch.where(idx < x.shape[1], idx, greedy)
    return torch.where(temperature > 0, idx, greedy)


def _row_params_fn(t_ptr, mp_ptr, row, HAS_MIN_P: tl.constexpr):
    """(temperature as given, the one to divide by (1 on greedy rows), log(min_p) or -inf when off)."""
    t_raw = tl.load(t_ptr + row)
    mp = tl.load(mp_ptr + row)
    if not HAS_MIN_P:
        mp = mp * 0.0
    return t_raw, tl.where(t_raw > 0, t_raw, 1.0), tl.where(mp > 0, tl.log(tl.maximum(mp, 1e-30)), -float("inf"))


def _block_max_fn(base, cols, n_cols):
    """The max of one block of columns and its first column."""
    x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
    bm = tl.max(x, 0)
    return bm, tl.min(tl.where(x == bm, cols, n_cols), 0).to(tl.int64)


def _kept_fn(base, cols, n_cols, m, t, lt):
    """exp((x - m) / t) where min-p keeps the token, else 0."""
    x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
    s = (x - m) / t
    return tl.where(s >= lt, tl.exp(s), 0.0)


def _draw_fn(base, n_cols, m, arg, t_raw, t, lt, psum_row, n_blocks, u, BLOCK: tl.constexpr, NC: tl.constexpr):
    """The token from the row's per-block kept masses (``psum_row``): the first block whose running mass exceeds
    u * Z, then the first token in it whose running mass does (or, where only float rounding of the block's sum
    put the target in it, its last kept token). Greedy rows, and a target no block passes, take the argmax.
    Both paths read the masses back from memory here, so they add them in the same order."""
    idx = tl.arange(0, NC)
    run = tl.cumsum(tl.load(psum_row + idx, mask=idx < n_blocks, other=0.0), 0)
    target = u * tl.max(run, 0)                     # Z: the last running sum (the masses are >= 0)
    k = tl.min(tl.where(run > target, idx, NC), 0)
    cols = tl.minimum(k, n_blocks - 1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    p = _kept(base, cols, n_cols, m, t, lt)
    c = tl.cumsum(p, 0) + tl.sum(tl.where(idx == k - 1, run, 0.0), 0)
    found = tl.min(tl.where((c > target) & (cols < n_cols), cols, n_cols), 0).to(tl.int64)
    last = tl.max(tl.where(p > 0, cols, -1), 0).to(tl.int64)
    tok = tl.where(k < n_blocks, tl.where(found < n_cols, found, last), arg)
    return tl.where(t_raw > 0, tok, arg)


def _sample_kernel(x_ptr, t_ptr, mp_ptr, u_ptr, psum_ptr, out_ptr, n_cols, stride, n_blocks,
                   BLOCK: tl.constexpr, NC: tl.constexpr, HAS_MIN_P: tl.constexpr):
    """One program per row: its two passes (the blocks' kept masses to ``psum``), then the draw."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    t_raw, t, lt = _row_params(t_ptr, mp_ptr, row, HAS_MIN_P)
    m = tl.max(tl.full((BLOCK,), -float("inf"), tl.float32), 0)
    arg = tl.min(tl.full((BLOCK,), 0, tl.int64), 0)
    for k in range(0, n_blocks):
        bm, bi = _block_max(base, k * BLOCK + offs, n_cols)
        arg = tl.where(bm > m, bi, arg)
        m = tl.maximum(m, bm)
    for k in range(0, n_blocks):
        tl.store(psum_ptr + row * n_blocks + k, tl.sum(_kept(base, k * BLOCK + offs, n_cols, m, t, lt), 0))
    tl.debug_barrier()
    u = tl.load(u_ptr + row).to(tl.float32)
    tl.store(out_ptr + row, _draw(base, n_cols, m, arg, t_raw, t, lt, psum_ptr + row * n_blocks, n_blocks, u,
                                  BLOCK, NC))


def _split_max_kernel(x_ptr, pmax_ptr, parg_ptr, n_cols, stride, n_blocks, BLOCK: tl.constexpr):
    """Launch A, grid (rows, blocks): each block's max and first argmax."""
    row, k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bm, bi = _block_max(x_ptr + row * stride, k * BLOCK + tl.arange(0, BLOCK), n_cols)
    tl.store(pmax_ptr + row * n_blocks + k, bm)
    tl.store(parg_ptr + row * n_blocks + k, bi)


def _row_max_fn(pmax_ptr, row, n_blocks, NC: tl.constexpr):
    """The row's max from its blocks' maxima, and the first block holding it."""
    idx = tl.arange(0, NC)
    pm = tl.load(pmax_ptr + row * n_blocks + idx, mask=idx < n_blocks, other=-float("inf"))
    m = tl.max(pm, 0)
    return m, tl.min(tl.where(pm == m, idx, NC), 0)


def _split_mass_kernel(x_ptr, t_ptr, mp_ptr, pmax_ptr, psum_ptr, n_cols, stride, n_blocks,
                       BLOCK: tl.constexpr, NC: tl.constexpr, HAS_MIN_P: tl.constexpr):
    """Launch B, grid (rows, blocks): each block's kept mass at the row's max."""
    row, k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    t_raw, t, lt = _row_params(t_ptr, mp_ptr, row, HAS_MIN_P)
    m, first = _row_max(pmax_ptr, row, n_blocks, NC)
    p = _kept(x_ptr + row * stride, k * BLOCK + tl.arange(0, BLOCK), n_cols, m, t, lt)
    tl.store(psum_ptr + row * n_blocks + k, tl.sum(p, 0))


def _split_draw_kernel(x_ptr, t_ptr, mp_ptr, u_ptr, pmax_ptr, parg_ptr, psum_ptr, out_ptr, n_cols, stride,
                       n_blocks, BLOCK: tl.constexpr, NC: tl.constexpr, HAS_MIN_P: tl.constexpr):
    """Launch C, grid (rows,): the draw from the blocks' maxima and kept masses."""
    row = tl.program_id(0).to(tl.int64)
    t_raw, t, lt = _row_params(t_ptr, mp_ptr, row, HAS_MIN_P)
    m, first = _row_max(pmax_ptr, row, n_blocks, NC)
    arg = tl.load(parg_ptr + row * n_blocks + first)
    u = tl.load(u_ptr + row).to(tl.float32)
    tl.store(out_ptr + row, _draw(x_ptr + row * stride, n_cols, m, arg, t_raw, t, lt, psum_ptr + row * n_blocks,
                                  n_blocks, u, BLOCK, NC))


if HAS_TRITON:
    _row_params = DeviceFunction(_row_params_fn)
    _block_max = DeviceFunction(_block_max_fn)
    _kept = DeviceFunction(_kept_fn)
    _draw = DeviceFunction(_draw_fn)
    _row_max = DeviceFunction(_row_max_fn)
_sample = LazyKernel(_sample_kernel)
_split_max = LazyKernel(_split_max_kernel)
_split_mass = LazyKernel(_split_mass_kernel)
_split_draw = LazyKernel(_split_draw_kernel)

# Batches of at most this many rows take the split path. On an H200 (benchmarks/gpu/bench_sample_small_batch.py)
# it was the faster one at every batch measured, 1 to 1024 rows: at 1 row 7.1 vs 49.3 us (128k vocabulary) and
# 7.8 vs 94.6 us (256k), at 1024 rows 252 vs 341 and 480 vs 656 us. Its three launches cost ~100 us of host time
# (vs ~50), hidden behind the forward pass the sampler is queued after.
SPLIT_MAX_ROWS = 1024
_BLOCK = 4096                   # columns per block: the unit of the partial sums, in both paths


def _sample_block(n_cols: int) -> int:
    """Columns per block for a row of ``n_cols`` (a function of the vocabulary only, never of the batch)."""
    return min(_BLOCK, next_pow2(max(n_cols, 16)))


def sample_temperature_min_p(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor | None,
                             uniforms: torch.Tensor, block: int | None = None,
                             split: bool | None = None) -> torch.Tensor:
    """One token per row of ``softmax(logits / T)`` restricted to min-p, at the row's uniform.
    ``block``: columns per block (tests force several on a small vocabulary); ``split``: the blocks spread over
    programs (True) or one program per row (False); None: split for at most ``SPLIT_MAX_ROWS`` rows. Both give
    the same tokens."""
    if not use_triton(logits):
        return sample_temperature_min_p_ref(logits, temperature, min_p, uniforms)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if not rows:
        return out
    t = temperature.float().contiguous()
    mp = t if min_p is None else min_p.float().contiguous()
    u = uniforms.contiguous()
    blk = block or _sample_block(n)
    n_blocks = cdiv(n, blk)
    nc = max(64, next_pow2(n_blocks))             # (a few sizes: each is a compiled variant)
    kw = dict(BLOCK=blk, NC=nc, HAS_MIN_P=min_p is not None, num_warps=8)
    if split is None:
        split = rows <= SPLIT_MAX_ROWS and n_blocks > 1
    psum = torch.empty(rows, n_blocks, dtype=torch.float32, device=x.device)
    if not split:
        _sample(x.device)[(rows,)](x, t, mp, u, psum, out, n, x.stride(0), n_blocks, **kw)
        return out
    pmax = torch.empty(rows, n_blocks, dtype=torch.float32, device=x.device)
    parg = torch.empty(rows, n_blocks, dtype=torch.int64, device=x.device)
    _split_max(x.device)[(rows, n_blocks)](x, pmax, parg, n, x.stride(0), n_blocks, BLOCK=blk, num_warps=8)
    _split_mass(x.device)[(rows, n_blocks)](x, t, mp, pmax, psum, n, x.stride(0), n_blocks, **kw)
    _split_draw(x.device)[(rows,)](x, t, mp, u, pmax, parg, psum, out, n, x.stride(0), n_blocks, **kw)
    return out


# ---- row statistics of dynatemp and top-n-sigma -------------------------------------------------------------
ROW_STATS = 4          # columns of ``row_stats``: max, entropy, finite count, std


def row_stats_ref(logits: torch.Tensor) -> torch.Tensor:
    """[N, 4] per row: the max logit, the entropy of softmax(logits) (nats), the number of finite
    logits, and their standard deviation (Bessel-corrected). PyTorch ops (the oracle of the kernels)."""
    x = logits.float()
    finite = x > -math.inf
    logp = torch.log_softmax(x, dim=-1)
    ent = -(logp.exp() * logp).nansum(dim=-1)
    cnt = finite.sum(dim=-1).to(x.dtype)
    mean = torch.where(finite, x, torch.zeros_like(x)).sum(dim=-1, keepdim=True) / cnt[:, None]
    var = (torch.where(finite, x - mean, torch.zeros_like(x)) ** 2).sum(dim=-1) / (cnt - 1).clamp(min=1)
    return torch.stack([x.max(dim=-1).values, ent, cnt, var.sqrt()], dim=1)


def _row_stats_kernel(x_ptr, out_ptr, n_cols, stride, BLOCK: tl.constexpr):
    """One read of the row: an online softmax for the entropy (log s - sum e (x - m) / s, with every
    sum taken relative to the running max m) and Chan's merge of per-block means for the variance."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
    m = zero - float("inf")
    s = zero          # sum exp(x - m)
    a = zero          # sum exp(x - m) * (x - m)
    n = zero
    mean = zero
    m2 = zero
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        fin = x > -float("inf")
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new > -float("inf"), m_new, 0.0)
        d = tl.where(fin, x - shift, 0.0)
        e = tl.where(fin, tl.exp(d), 0.0)
        dm = tl.where(s > 0, m - shift, 0.0)        # (nothing summed yet: m may still be -inf)
        scale = tl.where(s > 0, tl.exp(dm), 0.0)
        a = scale * (a + dm * s) + tl.sum(e * d, 0)
        s = s * scale + tl.sum(e, 0)
        m = m_new
        nb = tl.sum(fin.to(tl.float32), 0)
        mb = tl.sum(tl.where(fin, x, 0.0), 0) / tl.maximum(nb, 1.0)
        m2b = tl.sum(tl.where(fin, (x - mb) * (x - mb), 0.0), 0)
        n_new = n + nb
        delta = mb - mean
        mean += delta * nb / tl.maximum(n_new, 1.0)
        m2 += m2b + delta * delta * n * nb / tl.maximum(n_new, 1.0)
        n = n_new
    ent = tl.log(s) - a / s
    std = tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0))
    tl.store(out_ptr + row * 4, m)
    tl.store(out_ptr + row * 4 + 1, ent)
    tl.store(out_ptr + row * 4 + 2, n)
    tl.store(out_ptr + row * 4 + 3, std)


_row_stats = LazyKernel(_row_stats_kernel)


def row_stats(logits: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``row_stats_ref`` in one read of the logits: a Triton kernel on the GPU, a C loop on the CPU
    (the reference where neither is available). Dynatemp and top-n-sigma both read it, so their
    dozen full-width passes become one."""
    x = logits.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if use_triton(x):
        out = torch.empty(x.shape[0], ROW_STATS, dtype=torch.float32, device=x.device)
        if x.shape[0]:
            _row_stats(x.device)[(x.shape[0],)](x, out, x.shape[1], x.stride(0),
                                                BLOCK=block or min(4096, max(16, 1 << (x.shape[1] - 1).bit_length())),
                                                num_warps=8)
        return out
    from aphrodite.kernels.cpu import ops as cpu_ops
    if x.device.type == "cpu" and cpu_ops.available(torch.float32):
        return cpu_ops.row_stats(x)
    return row_stats_ref(x)


# ---- structured output: the grammar's token bitmask ---------------------------------------------------------
def apply_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` with -inf where the [N, ceil(V/32)] int32 bitmask (xgrammar's layout: bit j of word i
    allows token 32*i + j) has a 0 bit. PyTorch ops, out of place (the oracle of the kernels)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :logits.shape[1]].bool()
    return logits.masked_fill(~allowed, -math.inf)


def _bitmask_kernel(x_ptr, m_ptr, n_cols, stride, m_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    word = tl.load(m_ptr + row * m_stride + cols // 32, mask=inside, other=-1)
    banned = ((word >> (cols % 32)) & 1) == 0
    tl.store(x_ptr + row * stride + cols, tl.full((BLOCK,), -float("inf"), tl.float32), mask=inside & banned)


_bitmask = LazyKernel(_bitmask_kernel)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``apply_bitmask_ref`` written into float32 ``logits`` in place (one read of the mask, writes only
    the banned entries): Triton on the GPU, a C loop on the CPU, the reference otherwise."""
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    mask = bitmask.to(torch.int32).contiguous()
    rows, n = logits.shape
    if use_triton(logits):
        if rows:
            _bitmask(logits.device)[(rows, triton_cdiv(n, block))](logits, mask, n, logits.stride(0), mask.stride(0),
                                                                   BLOCK=block)
        return logits
    from aphrodite.kernels.cpu import ops as cpu_ops
    if logits.device.type == "cpu" and cpu_ops.available(torch.float32) and logits.is_contiguous():
        cpu_ops.apply_bitmask_(logits, mask)
        return logits
    return logits.copy_(apply_bitmask_ref(logits, mask))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the sampler chain's tail on each row's top-k candidates, in one kernel -----------------------------------
# After top-k every later sampler, the skew and the draw read only each row's few hundred candidates; run one by
# one that is ~250 tiny launches per step. Here one program per row holds its candidates (value, token id) in
# registers and applies the stages of a plan in order (the sampler order with the re-sorts it needs, passed as two
# integers at launch, so one compiled kernel serves every order and every set of samplers). The PyTorch reference
# is the chain's candidate path (``samplers/chain.py``, ``run_chain_compact`` then the draw), which runs the same
# formulas sampler by sampler.
TAIL_TEMPERATURE, TAIL_NSIGMA, TAIL_SORT_DESC, TAIL_SORT_ID, TAIL_TOP_K_TOP_P, TAIL_TOP_A, TAIL_MIN_P, TAIL_TFS, \
    TAIL_ETA, TAIL_EPSILON, TAIL_TYPICAL, TAIL_QUADRATIC, TAIL_XTC, TAIL_SKEW = range(1, 15)
_PLAN_SLOTS = 15                 # stages per constexpr int (4 bits each)
_TAIL_MAX_BLOCK = 4096


def _ordered_fn(x):
    """float32 -> int32 with the same order (-0.0 counted as 0.0), for sort keys."""
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


def _sort_by_fn(hi, ids, cols, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """Columns ordered by (hi, token id) ascending: returns (the old column now at each place, its token id)."""
    key = (hi.to(tl.int64) << 32) + (ids.to(tl.int64) * BLOCK + cols.to(tl.int64))
    key = tl.sort(key, 0)
    lo = key - ((key >> 32) << 32)
    return (lo & (BLOCK - 1)).to(tl.int32), (lo >> LOG_BLOCK).to(tl.int32)


def _gather_fn(scr, x, at, cols):
    """``x`` read at columns ``at`` (through the row's scratch: registers cannot be indexed)."""
    tl.debug_barrier()
    tl.store(scr + cols, x)
    tl.debug_barrier()
    return tl.load(scr + at)


def _scatter_fn(scr, x, at, cols):
    """The inverse of ``_gather_fn``: y[at[j]] = x[j]."""
    tl.debug_barrier()
    tl.store(scr + at, x)
    tl.debug_barrier()
    return tl.load(scr + cols)


def _shifted_fn(scr, x, cols, delta, BLOCK: tl.constexpr):
    """x[j + delta] (0 outside the row)."""
    tl.debug_barrier()
    tl.store(scr + cols, x)
    tl.debug_barrier()
    at = cols + delta
    return tl.load(scr + at, mask=(at >= 0) & (at < BLOCK), other=0.0)


def _pow_fn(b, e):
    """b ** e for b >= 0 (torch.pow's values at 0 and nan)."""
    return tl.where(e == 0, 1.0, tl.exp2(e * tl.log2(b)))


def _lowest_id_fn(cond, ids):
    return tl.min(tl.where(cond, ids, 2147483647), 0)


def _temperature_fn(t, dmin_ptr, dmax_ptr, dexp_ptr, row, ent, cnt, DYN: tl.constexpr):
    """``truncation.temperatures`` for one row (``ent``, ``cnt``: its entropy and finite count, read when DYN)."""
    if DYN:
        dmin = tl.load(dmin_ptr + row)
        dmax = tl.load(dmax_ptr + row)
        dyn_t = dmin + (dmax - dmin) * _pow(ent / tl.log(cnt), tl.load(dexp_ptr + row))
        t = tl.where((dmin != 0) | (dmax != 0), dyn_t, t)
    t = tl.where(t != t, 1e-5, t)
    return tl.maximum(t, 1e-5)


def _entropy_count_std_fn(v):
    """``row_stats`` of the candidates: (max, entropy, finite count, Bessel std)."""
    fin = v > -float("inf")
    m = tl.max(v, 0)
    e = tl.exp(v - m)
    s = tl.sum(e, 0)
    logp = v - m - tl.log(s)
    ent = -tl.sum(tl.where(fin, tl.exp(logp) * logp, 0.0), 0)
    cnt = tl.sum(fin.to(tl.float32), 0)
    mean = tl.sum(tl.where(fin, v, 0.0), 0) / cnt
    d = tl.where(fin, v - mean, 0.0)
    std = tl.sqrt(tl.sum(d * d, 0) / tl.maximum(cnt - 1.0, 1.0))
    return m, ent, cnt, std


def _tail_kernel(val_ptr, id_ptr, val_stride, id_stride, n_cols, vocab, stats_ptr,
                 temp_ptr, dmin_ptr, dmax_ptr, dexp_ptr, nsig_ptr, nsig_on_ptr, k_ptr, p_ptr, a_ptr, minp_ptr,
                 tfs_ptr, tfs_on_ptr, eta_ptr, eps_ptr, typ_ptr, typ_on_ptr, qk_ptr, qs_ptr, q_on_ptr,
                 xthr_ptr, xprob_ptr, xu_ptr, skew_ptr, greedy_t_ptr, u_ptr, scratch_ptr, out_ptr, final_ptr,
                 final_id_ptr, PLAN0, PLAN1, DEF_NSIGMA: tl.constexpr,
                 DEF_TEMP: tl.constexpr,
                 DYN: tl.constexpr, HAS_K: tl.constexpr, HAS_P: tl.constexpr, BLOCK: tl.constexpr,
                 LOG_BLOCK: tl.constexpr, KEEP_FINAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    v = tl.load(val_ptr + row * val_stride + cols, mask=inside, other=-float("inf")).to(tl.float32)
    ids = tl.load(id_ptr + row * id_stride + cols, mask=inside, other=0).to(tl.int32)
    ids = tl.where(inside, ids, vocab + cols)          # padding: ids past the vocabulary, each its own
    scr = scratch_ptr + row * BLOCK
    neg_inf = -float("inf")
    # Temperature and top-n-sigma deferred to here from just before top-k, on the row statistics of the
    # whole-vocabulary logits (their cuts and divisions keep the order top-k selected on).
    if DEF_NSIGMA:
        cut = tl.load(stats_ptr + row * 4) - tl.load(nsig_ptr + row) * tl.load(stats_ptr + row * 4 + 3)
        v = tl.where((tl.load(nsig_on_ptr + row) != 0) & (v < cut), neg_inf, v)
    if DEF_TEMP:
        if DYN:
            ent = tl.load(stats_ptr + row * 4 + 1)
            cnt = tl.load(stats_ptr + row * 4 + 2)
        else:
            ent = 0.0
            cnt = 1.0
        v = v / _temperature(tl.load(temp_ptr + row), dmin_ptr, dmax_ptr, dexp_ptr, row, ent, cnt, DYN)
    # The plan is a run-time argument (4 bits a stage, 0: nothing): one compiled kernel serves every sampler
    # order and every set of samplers (a new combination in a batch never waits for a compile).
    plan = PLAN0.to(tl.int64)
    for i in range(0, 30):
        code = (plan & 15).to(tl.int32)
        plan = tl.where(i == 14, PLAN1.to(tl.int64), plan >> 4)
        if code == 1:      # TAIL_TEMPERATURE
            m, ent, cnt, std = _entropy_count_std(v)
            v = v / _temperature(tl.load(temp_ptr + row), dmin_ptr, dmax_ptr, dexp_ptr, row, ent, cnt, DYN)
        if code == 2:      # TAIL_NSIGMA
            m, ent, cnt, std = _entropy_count_std(v)
            v = tl.where((tl.load(nsig_on_ptr + row) != 0) & (v < m - tl.load(nsig_ptr + row) * std), neg_inf, v)
        if code == 3:      # TAIL_SORT_DESC: by value descending, ties by token id (a stable sort's order)
            at, ids = _sort_by(-1 - _ordered(v), ids, cols, BLOCK, LOG_BLOCK)
            v = _gather(scr, v, at, cols)
        if code == 4:      # TAIL_SORT_ID
            at, ids = _sort_by(tl.zeros((BLOCK,), tl.int32), ids, cols, BLOCK, LOG_BLOCK)
            v = _gather(scr, v, at, cols)
        if code == 5:      # TAIL_TOP_K_TOP_P (sorted): ties at the k-th value stay; then the nucleus
            if HAS_K:
                kk = tl.minimum(tl.load(k_ptr + row) - 1, n_cols - 1)
                kth = tl.max(tl.where(cols == kk, v, neg_inf), 0)
                v = tl.where(v < kth, neg_inf, v)
            if HAS_P:
                m = tl.max(v, 0)
                e = tl.exp(v - m)
                p = e / tl.sum(e, 0)
                before = tl.cumsum(p, 0) - p
                v = tl.where(before >= tl.load(p_ptr + row), neg_inf, v)
        if code == 6:      # TAIL_TOP_A
            m = tl.max(v, 0)
            lse = m + tl.log(tl.sum(tl.exp(v - m), 0))
            v = tl.where(v - lse < tl.log(tl.load(a_ptr + row)) + 2 * (m - lse), neg_inf, v)
        if code == 7:      # TAIL_MIN_P
            v = tl.where(v < tl.max(v, 0) + tl.log(tl.load(minp_ptr + row)), neg_inf, v)
        if code == 8:      # TAIL_TFS (sorted; columns past the row stand for the rest of the vocabulary: p = 0)
            m = tl.max(v, 0)
            e = tl.exp(v - m)
            p = e / tl.sum(e, 0)
            p1 = _shifted(scr, p, cols, 1, BLOCK)
            p2 = _shifted(scr, p, cols, 2, BLOCK)
            d2 = tl.abs((p2 - p1) - (p1 - p))
            cdf = tl.cumsum(d2 / tl.sum(d2, 0), 0)
            prev = _shifted(scr, cdf, cols, -1, BLOCK)
            drop = (cols >= 1) & (prev > tl.load(tfs_ptr + row)) & (tl.load(tfs_on_ptr + row) != 0)
            v = tl.where(drop, neg_inf, v)
        if code == 9:      # TAIL_ETA
            m = tl.max(v, 0)
            logp = v - m - tl.log(tl.sum(tl.exp(v - m), 0))
            p = tl.exp(logp)
            pl = p * logp
            neg_ent = tl.sum(tl.where(pl == pl, pl, 0.0), 0)
            eta = tl.load(eta_ptr + row)
            eps = tl.minimum(eta, tl.sqrt(eta) * tl.exp(neg_ent))
            keep = _lowest_id(p == tl.max(p, 0), ids)
            v = tl.where((p < eps) & (ids != keep), neg_inf, v)
        if code == 10:     # TAIL_EPSILON
            m = tl.max(v, 0)
            lse = m + tl.log(tl.sum(tl.exp(v - m), 0))
            keep = _lowest_id(v == m, ids)
            v = tl.where((v - lse < tl.log(tl.load(eps_ptr + row))) & (ids != keep), neg_inf, v)
        if code == 11:     # TAIL_TYPICAL: by |surprisal - entropy| (ties: token id) until the mass reaches p
            m = tl.max(v, 0)
            logp = v - m - tl.log(tl.sum(tl.exp(v - m), 0))
            p = tl.exp(logp)
            pl = p * logp
            neg_ent = tl.sum(tl.where(pl == pl, pl, 0.0), 0)
            at, _unused = _sort_by(_ordered(tl.abs(neg_ent - logp)), ids, cols, BLOCK, LOG_BLOCK)
            mass = tl.cumsum(_gather(scr, p, at, cols), 0)
            drop = (mass >= tl.load(typ_ptr + row)) & (cols > 0)
            drop = _scatter(scr, drop.to(tl.float32), at, cols) != 0
            v = tl.where(drop & (tl.load(typ_on_ptr + row) != 0), neg_inf, v)
        if code == 12:     # TAIL_QUADRATIC
            diff = v - tl.max(v, 0)
            delta = diff - diff * diff * (tl.load(qs_ptr + row) * diff - tl.load(qk_ptr + row))
            delta = tl.where(delta != delta, 0.0, delta)
            v = tl.where(tl.load(q_on_ptr + row) != 0, v - delta, v)
        if code == 13:     # TAIL_XTC
            m = tl.max(v, 0)
            lse = m + tl.log(tl.sum(tl.exp(v - m), 0))
            above = v - lse >= tl.log(tl.load(xthr_ptr + row))
            fire = (tl.load(xu_ptr + row) < tl.load(xprob_ptr + row)) & (tl.sum(above.to(tl.int32), 0) >= 2)
            low = tl.min(tl.where(above, v, float("inf")), 0)
            keep = _lowest_id(above & (v == low), ids)
            v = tl.where(above & (ids != keep), tl.where(fire, neg_inf, v), v)
        if code == 14:     # TAIL_SKEW (token-id order): the CDF raised to exp(skew), differenced back
            sk = tl.load(skew_ptr + row)
            m = tl.max(v, 0)
            e = tl.exp(v - m)
            cdf = _pow(tl.maximum(tl.cumsum(e / tl.sum(e, 0), 0), 0.0), tl.exp(sk))
            q = cdf - _shifted(scr, cdf, cols, -1, BLOCK)
            v = tl.where(sk != 0, tl.log(tl.maximum(q, 0.0)), v)
    # The draw (token-id order): the first candidate whose running mass exceeds u * total (``sample_from_logits``).
    m = tl.max(v, 0)
    e = tl.exp(v - m)
    p = e / tl.sum(e, 0)
    cdf = tl.cumsum(p, 0)
    total = tl.max(tl.where(cols == n_cols - 1, cdf, neg_inf), 0)
    target = tl.load(u_ptr + row).to(tl.float32) * total
    idx = tl.minimum(tl.min(tl.where((cdf > target) & inside, cols, n_cols), 0), n_cols - 1)
    picked = tl.max(tl.where(cols == idx, p, neg_inf), 0)
    drawn = tl.where(picked > 0, tl.min(tl.where(cols == idx, ids, 2147483647), 0),
                     _lowest_id(p == tl.max(p, 0), ids))
    tok = tl.where(tl.load(greedy_t_ptr + row) > 0, drawn, _lowest_id(v == m, ids))
    tl.store(out_ptr + row, tok.to(tl.int64))
    if KEEP_FINAL:        # the logits the draw read (tests)
        tl.store(final_ptr + row * BLOCK + cols, v)
        tl.store(final_id_ptr + row * BLOCK + cols, ids)


if HAS_TRITON:
    _ordered = DeviceFunction(_ordered_fn)
    _sort_by = DeviceFunction(_sort_by_fn)
    _gather = DeviceFunction(_gather_fn)
    _scatter = DeviceFunction(_scatter_fn)
    _shifted = DeviceFunction(_shifted_fn)
    _pow = DeviceFunction(_pow_fn)
    _lowest_id = DeviceFunction(_lowest_id_fn)
    _temperature = DeviceFunction(_temperature_fn)
    _entropy_count_std = DeviceFunction(_entropy_count_std_fn)
_tail = LazyKernel(_tail_kernel)


def tail_block(width: int, vocab_size: int) -> int:
    """Columns one program of ``sample_candidates`` holds for ``width`` candidates; 0 when the kernel cannot
    take them (too many for one program, or token ids too large for its sort keys)."""
    block = next_pow2(max(width, 16))
    return block if block <= _TAIL_MAX_BLOCK and (vocab_size + block) * block < 2 ** 31 else 0


def sample_candidates(values: torch.Tensor, ids: torch.Tensor, vocab_size: int, plan: list[int],
                      columns: dict[str, torch.Tensor], uniforms: torch.Tensor, temperature: torch.Tensor,
                      stats: torch.Tensor | None = None, xtc_uniforms: torch.Tensor | None = None,
                      skew: torch.Tensor | None = None, deferred_nsigma: bool = False,
                      deferred_temperature: bool = False, final: list | None = None) -> torch.Tensor:
    """One token per row from its top-k candidates (``values[i, j]`` the logit of token ``ids[i, j]``, in any
    order) after the stages of ``plan`` (``TAIL_*`` codes, in order; ``TAIL_SORT_DESC`` before the stages that
    need the candidates by value, ``TAIL_SORT_ID`` before ``TAIL_SKEW`` and the draw, which walk token-id
    order). ``columns``: the sampler parameters by ``SamplingMetadata.columns`` name. ``stats``: ``row_stats``
    of the whole-vocabulary logits for the deferred temperature / top-n-sigma. ``temperature``: 0 marks a
    greedy row (its argmax). ``final``: a list that receives the logits the draw read, as [rows, vocab]
    (tests). Triton (compiled or interpreted) only: the CPU runs the chain."""
    rows, width = values.shape
    block = tail_block(width, vocab_size)
    assert block and len(plan) <= 2 * _PLAN_SLOTS and all(0 < c < 16 for c in plan)
    out = torch.empty(rows, dtype=torch.int64, device=values.device)
    if not rows:
        return out
    codes = [0] * (2 * _PLAN_SLOTS)
    codes[:len(plan)] = plan
    # Bit 62 is never decoded: it keeps Triton from specializing a plan word equal to 1 into a constant.
    plan0 = sum(c << (4 * i) for i, c in enumerate(codes[:_PLAN_SLOTS])) | 1 << 62
    plan1 = sum(c << (4 * i) for i, c in enumerate(codes[_PLAN_SLOTS:])) | 1 << 62
    # Absent columns: never read (their stages are not in the plan), but of the dtype a present one has, so
    # every batch launches the same compiled kernel (pointer dtypes are part of its signature).
    f32, b8 = values.new_empty(rows, dtype=torch.float32), values.new_empty(rows, dtype=torch.bool)
    dummy = {"nsigma_on": b8, "tfs_on": b8, "typical_p_on": b8, "smoothing_on": b8,
             "top_k": values.new_empty(rows, dtype=torch.int64)}
    col = lambda name: columns.get(name, dummy.get(name, f32))  # noqa: E731
    scratch = torch.empty(rows, block, dtype=torch.float32, device=values.device)
    keep = final is not None
    fin = torch.empty(rows, block if keep else 1, dtype=torch.float32, device=values.device)
    fin_ids = torch.empty(rows, block if keep else 1, dtype=torch.int32, device=values.device)
    x = values if values.stride(-1) == 1 else values.contiguous()
    i = ids if ids.stride(-1) == 1 else ids.contiguous()
    _tail(x.device)[(rows,)](
        x, i, x.stride(0), i.stride(0), width, vocab_size, f32 if stats is None else stats,
        col("temperature"), col("dynatemp_min"), col("dynatemp_max"), col("dynatemp_exponent"), col("nsigma"),
        col("nsigma_on"), col("top_k"), col("top_p"), col("top_a"), col("min_p"), col("tfs"), col("tfs_on"),
        col("eta_cutoff"), col("epsilon_cutoff"), col("typical_p"), col("typical_p_on"), col("smoothing_k"),
        col("smoothing_s"), col("smoothing_on"), col("xtc_threshold"), col("xtc_probability"),
        f32 if xtc_uniforms is None else xtc_uniforms, f32 if skew is None else skew, temperature, uniforms,
        scratch, out, fin, fin_ids, PLAN0=plan0, PLAN1=plan1, DEF_NSIGMA=deferred_nsigma, DEF_TEMP=deferred_temperature,
        DYN="dynatemp_min" in columns, HAS_K="top_k" in columns, HAS_P="top_p" in columns, BLOCK=block,
        LOG_BLOCK=block.bit_length() - 1, KEEP_FINAL=keep, num_warps=4 if block <= 512 else 8)
    if keep:
        real = fin_ids < vocab_size
        full = fin.new_full((rows, vocab_size + block), float("-inf"))
        final.append(full.scatter_(1, torch.where(real, fin_ids, vocab_size + torch.arange(block, device=fin.device)
                                                  ).long(), fin)[:, :vocab_size])
    return out


# ---- DRY: per history position, the token it would repeat and its lowered logit -------------------------------
_DRY_BLOCK = 1024      # history positions per loop iteration of ``dry_proposals``


def dry_proposals_ref(logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, suffix: torch.Tensor,
                      trailing: torch.Tensor, bounds: torch.Tensor, multiplier: torch.Tensor, base: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per history position j of each DRY row: (the token after j, the logit DRY proposes for it), Aphrodite's
    rules. A token is penalized when an earlier occurrence of the newest token was followed by it and the
    tokens before both occurrences match (no sequence breaker inside): the match length n is that shared run
    plus one and the logit drops by multiplier * base ** (n - allowed_length). Only the last ``max_occurrences``
    occurrences count (0: all), the scan stops at the first (most recent) one reaching ``early_exit``, runs are
    capped by the distance to the last breaker and ``max_ngram``, and ``range`` limits the window (0: all).
    ``bounds`` [R, 6]: window start, newest position, match cap, allowed length, occurrences, early exit.
    A position proposing nothing proposes the token's own logit; the lowest proposal per token is the one
    meant (the longest match). PyTorch ops: the CPU path and the oracle of the kernel."""
    R, W = history.shape
    pos = torch.arange(W, device=history.device)[None, :]
    start, last_pos, cap0, allowed, limit, early = bounds.split(1, dim=1)
    cur = torch.minimum(trailing[:, None], cap0)     # allowed >= 0: a row that cannot match has cur <= 0
    last = history.gather(1, last_pos)
    ep = (history == last) & (pos >= start) & (pos < last_pos) & (cur > allowed)
    rank = ep.flip(1).cumsum(1).flip(1)          # 1 = the most recent earlier occurrence
    match = torch.minimum(suffix - 1, torch.minimum(pos - start, cur))
    new_len = torch.where(ep & (rank <= limit) & (match > 0), match + 1, 0)
    hit = (new_len > 0) & (new_len >= early)
    first_hit = torch.where(hit, rank, W + 2).amin(dim=1, keepdim=True)
    new_len = torch.where(rank <= first_hit, new_len, 0)
    nxt = torch.cat([history[:, 1:], history[:, -1:]], dim=1).long()
    cur_logit = logits[rows[:, None].expand(R, W), nxt]
    n = new_len.to(logits.dtype)
    scale = base[:, None] ** (n - allowed.to(logits.dtype))
    return nxt, torch.where(new_len > 0, cur_logit - multiplier[:, None] * scale, cur_logit)


def _dry_match_fn(hrow, srow, pos, inside, last, start, last_pos, cur, allowed, limit, carry):
    """One chunk of a DRY row's history: each position's occurrence rank (``carry`` occurrences are newer) and
    its proposed match length (0: none), and how many occurrences the chunk holds; both passes of
    ``_dry_kernel`` read the history through this, so they cannot disagree."""
    h = tl.load(hrow + pos, mask=inside, other=0)
    s = tl.load(srow + pos, mask=inside, other=0).to(tl.int64)
    ep = (h == last) & (pos >= start) & (pos < last_pos) & (cur > allowed) & inside
    e = ep.to(tl.int32)
    rank = tl.cumsum(e, 0, reverse=True) + carry
    match = tl.minimum(s - 1, tl.minimum(pos - start, cur))
    new_len = tl.where(ep & (rank <= limit) & (match > 0), match + 1, 0)
    return rank, new_len, tl.sum(e, 0)


if HAS_TRITON:
    _dry_match = DeviceFunction(_dry_match_fn)


def _dry_kernel(x_ptr, x_stride, rows_ptr, hist_ptr, hist_stride, suf_ptr, suf_stride, trail_ptr, bounds_ptr,
                mult_ptr, base_ptr, nxt_ptr, val_ptr, W, BLOCK: tl.constexpr):
    """One program per DRY row, two passes over its history from the newest position back (the occurrence
    rank is a reversed running count): pass 1 finds the first occurrence reaching the early exit, pass 2
    writes every position's proposal."""
    r = tl.program_id(0).to(tl.int64)
    b = bounds_ptr + r * 6
    start = tl.load(b)
    last_pos = tl.load(b + 1)
    cur = tl.minimum(tl.load(trail_ptr + r).to(tl.int64), tl.load(b + 2))
    allowed = tl.load(b + 3)
    limit = tl.load(b + 4)
    early = tl.load(b + 5)
    hrow = hist_ptr + r * hist_stride
    srow = suf_ptr + r * suf_stride
    last = tl.load(hrow + last_pos)
    offs = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(W, BLOCK)
    zero = tl.sum(tl.zeros((BLOCK,), tl.int32), 0)
    first_hit = zero + W + 2
    carry = zero
    for i in range(0, n_chunks):
        pos = (n_chunks - 1 - i) * BLOCK + offs
        inside = pos < W
        rank, new_len, found = _dry_match(hrow, srow, pos, inside, last, start, last_pos, cur, allowed, limit, carry)
        carry += found
        hit = (new_len > 0) & (new_len >= early)
        first_hit = tl.minimum(first_hit, tl.min(tl.where(hit, rank, W + 2), 0))
    xrow = x_ptr + tl.load(rows_ptr + r) * x_stride
    mult = tl.load(mult_ptr + r)
    base = tl.load(base_ptr + r)
    carry = zero
    for i in range(0, n_chunks):
        pos = (n_chunks - 1 - i) * BLOCK + offs
        inside = pos < W
        rank, new_len, found = _dry_match(hrow, srow, pos, inside, last, start, last_pos, cur, allowed, limit, carry)
        carry += found
        new_len = tl.where(rank <= first_hit, new_len, 0)
        nxt = tl.load(hrow + tl.minimum(pos + 1, W - 1), mask=inside, other=0).to(tl.int64)
        x = tl.load(xrow + nxt, mask=inside, other=0.0)
        scale = tl.exp2((new_len - allowed).to(tl.float32) * tl.log2(base))
        val = tl.where(new_len > 0, x - mult * scale, x)
        tl.store(nxt_ptr + r * W + pos, nxt, mask=inside)
        tl.store(val_ptr + r * W + pos, val, mask=inside)


_dry = LazyKernel(_dry_kernel)


def dry_proposals(logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, suffix: torch.Tensor,
                  trailing: torch.Tensor, bounds: torch.Tensor, multiplier: torch.Tensor, base: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``dry_proposals_ref`` in one kernel launch on the GPU (its ~30 small ops per step otherwise)."""
    R, W = history.shape
    if not use_triton(logits) or logits.dtype != torch.float32 or logits.stride(-1) != 1 or not R or not W:
        return dry_proposals_ref(logits, rows, history, suffix, trailing, bounds, multiplier, base)
    nxt = torch.empty(R, W, dtype=torch.long, device=logits.device)
    vals = torch.empty(R, W, dtype=torch.float32, device=logits.device)
    h = history if history.stride(-1) == 1 else history.contiguous()
    s = suffix if suffix.stride(-1) == 1 else suffix.contiguous()
    _dry(logits.device)[(R,)](logits, logits.stride(0), rows.contiguous(), h, h.stride(0), s, s.stride(0),
                              trailing.contiguous(), bounds.contiguous(), multiplier.float().contiguous(),
                              base.float().contiguous(), nxt, vals, W, BLOCK=min(_DRY_BLOCK, next_pow2(max(W, 16))),
                              num_warps=4)
    return nxt, vals


# ---- penalties and no_repeat_ngram: the new logit of every history position's token ---------------------------
def penalty_values_ref(logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, counts: torch.Tensor,
                       presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """[R, W]: the penalized logit of each history position's token (vLLM/Aphrodite: repetition divides a
    positive / multiplies a negative logit of a token seen in the prompt or output; frequency subtracts
    count * f; presence subtracts p once per output token seen). Positions sharing a token get the same
    value. PyTorch ops: the CPU path and the oracle of the kernel."""
    cur = logits[rows[:, None].expand_as(history), history]
    pen = repetition[:, None]
    new = torch.where(cur > 0, cur / pen, cur * pen)
    c = counts.to(logits.dtype)
    return new - frequency[:, None] * c - presence[:, None] * (c > 0).to(logits.dtype)


def ngram_values_ref(logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, suffix: torch.Tensor,
                     lengths: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """[R, W]: -inf where history position j's token follows an earlier copy of the last n - 1 tokens (the
    run ending at j - 1 shares >= n - 1 = ``need`` tokens with the history's end; n = 1: every token already
    seen), else the token's own logit. PyTorch ops: the CPU path and the oracle of the kernel."""
    W = history.shape[1]
    pos = torch.arange(W, device=history.device)[None, :]
    prev = torch.nn.functional.pad(suffix[:, :-1], (1, 0))
    hit = (pos < lengths[:, None]) & (prev >= need)
    cur = logits[rows[:, None].expand_as(history), history]
    return torch.where(hit, torch.full_like(cur, float("-inf")), cur)


_HISTORY_BLOCK = 1024    # history positions per program of the penalty / n-gram kernel


def _history_values_kernel(x_ptr, x_stride, rows_ptr, hist_ptr, hist_stride, aux_ptr, aux_stride, p0_ptr, p1_ptr,
                           p2_ptr, out_ptr, W, NGRAM: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (row, block of history positions): ``penalty_values_ref`` (aux: counts; p0, p1, p2:
    presence, frequency, repetition) or, with NGRAM, ``ngram_values_ref`` (aux: suffix; p0: lengths, p1: need)."""
    r = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = pos < W
    tok = tl.load(hist_ptr + r * hist_stride + pos, mask=inside, other=0).to(tl.int64)
    cur = tl.load(x_ptr + tl.load(rows_ptr + r) * x_stride + tok, mask=inside, other=0.0)
    if NGRAM:
        prev = tl.load(aux_ptr + r * aux_stride + pos - 1, mask=inside & (pos >= 1), other=0).to(tl.int64)
        hit = (pos < tl.load(p0_ptr + r)) & (prev >= tl.load(p1_ptr + r))
        val = tl.where(hit, -float("inf"), cur)
    else:
        c = tl.load(aux_ptr + r * aux_stride + pos, mask=inside, other=0).to(tl.float32)
        pen = tl.load(p2_ptr + r)
        new = tl.where(cur > 0, cur / pen, cur * pen)
        val = new - tl.load(p1_ptr + r) * c - tl.load(p0_ptr + r) * (c > 0).to(tl.float32)
    tl.store(out_ptr + r * W + pos, val, mask=inside)


_history_values = LazyKernel(_history_values_kernel)


def _launch_history_values(logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, aux: torch.Tensor,
                           p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, ngram: bool) -> torch.Tensor:
    R, W = history.shape
    out = torch.empty(R, W, dtype=torch.float32, device=logits.device)
    h = history if history.stride(-1) == 1 else history.contiguous()
    a = aux if aux.stride(-1) == 1 else aux.contiguous()
    block = min(_HISTORY_BLOCK, next_pow2(max(W, 16)))
    _history_values(logits.device)[(R, triton_cdiv(W, block))](
        logits, logits.stride(0), rows.contiguous(), h, h.stride(0), a, a.stride(0), p0.contiguous(),
        p1.contiguous(), p2.contiguous(), out, W, NGRAM=ngram, BLOCK=block, num_warps=4)
    return out


def _history_kernel_ok(logits: torch.Tensor, history: torch.Tensor) -> bool:
    return use_triton(logits) and logits.dtype == torch.float32 and logits.stride(-1) == 1 and history.numel() > 0


def penalty_values(logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, counts: torch.Tensor,
                   presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """``penalty_values_ref`` in one kernel launch on the GPU."""
    if not _history_kernel_ok(logits, history):
        return penalty_values_ref(logits, rows, history, counts, presence, frequency, repetition)
    return _launch_history_values(logits, rows, history, counts, presence.float(), frequency.float(),
                                  repetition.float(), ngram=False)


def ngram_values(logits: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, suffix: torch.Tensor,
                 lengths: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """``ngram_values_ref`` in one kernel launch on the GPU."""
    if not _history_kernel_ok(logits, history):
        return ngram_values_ref(logits, rows, history, suffix, lengths, need)
    return _launch_history_values(logits, rows, history, suffix, lengths, need.reshape(-1), need, ngram=True)


# ---- the per-request sampling state after a step: one launch instead of a few dozen ---------------------------
STATE_COUNTS, STATE_HISTORY, STATE_DRY, STATE_NGRAM = 1, 2, 4, 8     # flags of ``update_sampling_state``
_STATE_BLOCK = 1024


def _suffix_update_fn(buf_row, hist_row, tok, length, cap, brk, BLOCK: tl.constexpr):
    """buf[p] = min(buf[p - 1] + 1, cap) where history[p] == tok (p < length, no breaker), else 0, in place:
    blocks from the newest position back, so each reads its predecessor before that is rewritten."""
    offs = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(length + 1, BLOCK)
    for i in range(0, n_chunks):
        p = (n_chunks - 1 - i) * BLOCK + offs
        inside = p <= length
        h = tl.load(hist_row + p, mask=p < length, other=-1)
        prev = tl.load(buf_row + p - 1, mask=(p >= 1) & inside, other=0)
        shifted = tl.minimum(prev + 1, cap)
        new = tl.where((h == tok) & (p < length) & (brk == 0), shifted, 0)
        tl.debug_barrier()
        tl.store(buf_row + p, new.to(tl.int32), mask=inside)
        tl.debug_barrier()


def _state_update_kernel(info_ptr, sampled_ptr, counts_ptr, counts_stride, hist_ptr, hist_stride, dsuf_ptr,
                         dsuf_stride, nsuf_ptr, nsuf_stride, trail_ptr, brk_ptr, brk_stride, n_brk, cap_ptr,
                         BLOCK: tl.constexpr, NB: tl.constexpr):
    """One program per tracked row: its output count, its history, DRY's trailing run and suffix lengths and
    no_repeat_ngram's suffix lengths after appending the sampled token (the flags say which it keeps)."""
    h = tl.program_id(0).to(tl.int64)
    row = tl.load(info_ptr + h * 4)
    slot = tl.load(info_ptr + h * 4 + 1)
    length = tl.load(info_ptr + h * 4 + 2)
    flags = tl.load(info_ptr + h * 4 + 3)
    tok = tl.load(sampled_ptr + row).to(tl.int64)
    if (flags & 1) != 0:
        c = counts_ptr + slot * counts_stride + tok
        tl.store(c, tl.load(c) + 1)
    if (flags & 2) != 0:
        tl.store(hist_ptr + slot * hist_stride + length, tok)
    if (flags & 4) != 0:
        b = tl.arange(0, NB)
        brk = tl.max((tl.load(brk_ptr + slot * brk_stride + b, mask=b < n_brk, other=-1) == tok).to(tl.int32), 0)
        t = trail_ptr + slot
        tl.store(t, tl.where(brk != 0, 0, tl.load(t) + 1))
        _suffix_update(dsuf_ptr + slot * dsuf_stride, hist_ptr + slot * hist_stride, tok, length,
                       tl.load(cap_ptr + slot), brk, BLOCK)
    if (flags & 8) != 0:
        # (no cap: a suffix never exceeds the history's length; no breakers)
        _suffix_update(nsuf_ptr + slot * nsuf_stride, hist_ptr + slot * hist_stride, tok, length,
                       (length + 2).to(tl.int32), flags & 0, BLOCK)


if HAS_TRITON:
    _suffix_update = DeviceFunction(_suffix_update_fn)
_state_update = LazyKernel(_state_update_kernel)


def update_sampling_state(info: torch.Tensor, sampled: torch.Tensor, counts: torch.Tensor | None,
                          history: torch.Tensor | None, dry_suffix: torch.Tensor | None,
                          ngram_suffix: torch.Tensor | None, dry_trailing: torch.Tensor | None,
                          dry_breakers: torch.Tensor | None, dry_cap: torch.Tensor | None) -> None:
    """Append each tracked row's sampled token to its state in one launch (Triton; the caller's PyTorch ops
    are the CPU path and the reference). ``info`` [H, 4] int64: batch row, slot, history length before the
    token, ``STATE_*`` flags. Buffers a flag does not use may be None."""
    H = info.shape[0]
    if not H:
        return
    any_buf = next(t for t in (counts, history, dry_suffix, ngram_suffix) if t is not None)
    pick = lambda t: any_buf if t is None else t  # noqa: E731
    stride = lambda t: 0 if t is None else t.stride(0)  # noqa: E731
    n_brk = 0 if dry_breakers is None else dry_breakers.shape[1]
    _state_update(sampled.device)[(H,)](
        info, sampled, pick(counts), stride(counts), pick(history), stride(history), pick(dry_suffix),
        stride(dry_suffix), pick(ngram_suffix), stride(ngram_suffix), pick(dry_trailing), pick(dry_breakers),
        stride(dry_breakers), n_brk, pick(dry_cap), BLOCK=_STATE_BLOCK, NB=next_pow2(max(n_brk, 2)), num_warps=4)
