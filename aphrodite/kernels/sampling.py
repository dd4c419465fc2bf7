"""Fused temperature + min-p + inverse-CDF draw: the sampler's common case in one kernel.

The seed's ``temperature=1.1, min_p=0.1`` through separate PyTorch ops reads and writes the
[rows, vocab] logits about ten times (scale, softmax, max, mask, softmax, cumsum, search); here
one program per row reads its logits three times and writes one token id:
pass 1 the max (and argmax), pass 2 the kept mass Z (min-p keeps (x - max) / T >= log(min_p)),
pass 3 the first token whose running mass exceeds u * Z. A row with temperature <= 0 is greedy.
"""
from __future__ import annotations

import math

import torch

from aphrodite.kernels.triton_utils import LazyKernel, tl, use_triton

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


def _sample_kernel(x_ptr, t_ptr, mp_ptr, u_ptr, out_ptr, n_cols, stride,
                   BLOCK: tl.constexpr, HAS_MIN_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    t_raw = tl.load(t_ptr + row)
    t = tl.where(t_raw > 0, t_raw, 1.0)
    # Pass 1: max and argmax.
    m = tl.max(tl.full((BLOCK,), -float("inf"), tl.float32), 0)
    arg = tl.min(tl.full((BLOCK,), 0, tl.int64), 0)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        bm = tl.max(x, 0)
        bi = tl.min(tl.where(x == bm, cols, n_cols), 0).to(tl.int64)
        arg = tl.where(bm > m, bi, arg)
        m = tl.maximum(m, bm)
    if HAS_MIN_P:
        mp = tl.load(mp_ptr + row)
        lt = tl.where(mp > 0, tl.log(tl.maximum(mp, 1e-30)), -float("inf"))
    else:
        lt = -float("inf")
    # Pass 2: the kept mass.
    z = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        s = (x - m) / t
        z += tl.sum(tl.where(s >= lt, tl.exp(s), 0.0), 0)
    target = tl.load(u_ptr + row).to(tl.float32) * z
    # Pass 3: the first token whose running mass exceeds the target.
    run = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
    found = tl.min(tl.full((BLOCK,), 0, tl.int64), 0) + n_cols
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        s = (x - m) / t
        p = tl.where(s >= lt, tl.exp(s), 0.0)
        c = tl.cumsum(p, 0) + run
        first = tl.min(tl.where((c > target) & (cols < n_cols), cols, n_cols), 0).to(tl.int64)
        found = tl.minimum(found, first)
        run += tl.sum(p, 0)
    tok = tl.where(found < n_cols, found, arg)
    tl.store(out_ptr + row, tl.where(t_raw > 0, tok, arg))


_sample = LazyKernel(_sample_kernel)


def sample_temperature_min_p(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor | None,
                             uniforms: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """One token per row of ``softmax(logits / T)`` restricted to min-p, at the row's uniform.
    ``block``: columns per loop iteration (tests force several blocks on a small vocabulary)."""
    if not use_triton(logits):
        return sample_temperature_min_p_ref(logits, temperature, min_p, uniforms)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        t = temperature.float().contiguous()
        mp = t if min_p is None else min_p.float().contiguous()
        _sample(x.device)[(rows,)](x, t, mp, uniforms.contiguous(), out, n, x.stride(0),
                                   BLOCK=block or min(4096, max(16, 1 << (n - 1).bit_length())),
                                   HAS_MIN_P=min_p is not None, num_warps=8)
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
