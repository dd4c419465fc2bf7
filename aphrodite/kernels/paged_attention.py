"""Triton paged attention over the KV cache layout of ``aphrodite.modeling.layers.attention``.

Cache, per layer: ``k_cache``/``v_cache`` of shape ``[num_blocks, block_size, num_kv_heads, head_dim]``;
token ``i`` of a sequence lives in slot ``block_table[i // block_size] * block_size + i % block_size``.
A batch is flat: ``q [T, Hq, D]``, ``query_start_loc [B + 1]``, ``seq_lens [B]`` (context including
this step's tokens), ``block_tables [B, max_blocks]``; decodes (one query token each) come first.

Kernels:
* ``reshape_and_cache``: scatter this step's K/V into their slots (slot -1 = padding, skipped).
* ``rope_and_cache`` (``aphrodite.kernels.rope_cache``): rotary embedding and the cache write in one launch.
* one attention kernel, two launch shapes sharing the same code:
  - prefill / chunked prefill: a program owns ``BLOCK_Q`` query tokens x all ``G`` query heads of one
    KV head (rows = token-major, head-minor), so each K/V tile is loaded once for the whole group.
    Query token ``j`` of a chunk sits at position ``seq_len - q_len + j`` and sees keys ``<=`` that
    position: the cached prefix plus the causal part of the chunk. Key tiles wholly visible to every
    row run without masks; only the tail tiles are masked. Programs find their sequence by a binary
    search over ``query_start_loc``, so the grid depends only on ``T`` and ``B`` (no host sync).
  - decode: one program per (sequence, KV head[, split]). With ``num_splits > 1`` (flash decoding)
    each program covers a slice of the context and writes a partial (output, max, sum); the last
    split of a (sequence, KV head) to finish merges them (an atomic arrival counter), so there is no
    reduce launch, and splits past a short context exit at once (a context of at most
    ``DECODE_SOLO_TILES`` tiles is not split at all). This keeps the GPU busy when few
    sequences have long contexts. With ``DecodeAppend`` the decode launch also rotates q and k and
    appends this step's k/v to the cache, so a decode layer's attention is a single launch.
    The split factor is a run-time argument (only its power-of-two bound is compiled in): the factor
    follows the batch and its longest context, and as a compile-time constant every new value met while
    serving cost a kernel compile of seconds inside a step.
Softmax is online in fp32 (base 2); fp32 inputs use IEEE dots so results match the reference to ~1e-5.

Everything launched for a decode step depends only on tensor shapes and the Python ints of the
metadata, never on tensor values read back to the host, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch

from aphrodite.kernels.triton_utils import LazyKernel, cdiv, next_pow2, tl, use_triton

if TYPE_CHECKING:
    from aphrodite.kernels.attention_metadata import AttentionMetadata

__all__ = [
    "DecodeAppend",
    "TritonAttentionBackend",
    "choose_num_splits",
    "paged_attention",
    "paged_attention_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# References (the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------

def _is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def reshape_and_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write k/v [T, Hkv, D] into their cache slots; slots < 0 are skipped. An fp8 cache stores
    ``k / k_scale`` and ``v / v_scale`` (saturated to the format's range)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kf = k_cache.view(-1, *k_cache.shape[2:])
    vf = v_cache.view(-1, *v_cache.shape[2:])
    if _is_fp8(k_cache):
        limit = torch.finfo(k_cache.dtype).max
        kq = (k[keep].float() / k_scale).clamp(-limit, limit).to(k_cache.dtype)
        vq = (v[keep].float() / v_scale).clamp(-limit, limit).to(v_cache.dtype)
        kf.view(torch.uint8).index_copy_(0, slots, kq.view(torch.uint8))
        vf.view(torch.uint8).index_copy_(0, slots, vq.view(torch.uint8))
        return
    kf.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    vf.index_copy_(0, slots, v[keep].to(v_cache.dtype))


class DecodeAppend(NamedTuple):
    """This step's un-rotated k/v and rotary inputs, for a decode launch that rotates q and k in
    registers and appends k/v to the cache itself (no separate rotary or cache-write launch)."""

    positions: torch.Tensor      # [T]
    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim]: cos half, then sin half
    k: torch.Tensor              # [T, Hkv, D], not rotated
    v: torch.Tensor              # [T, Hkv, D]
    slot_mapping: torch.Tensor   # [T]; -1 = do not write


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, max_query_len: int = 0, max_seq_len: int = 0,
                        num_decodes: int | None = None, max_decode_seq_len: int | None = None,
                        num_splits: int | None = None, append: DecodeAppend | None = None,
                        fused_reduce: bool = True, solo_tiles: int = 0, sliding_window: int | None = None,
                        logits_soft_cap: float | None = None, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor:
    """Per-sequence fp32 attention over the gathered cache; reads lengths back to the host.

    With ``append``: rotate copies of q and k, write k/v to the cache, then attend (q, k untouched).
    An fp8 cache's values are multiplied by ``k_scale``/``v_scale`` as they are read.
    """
    del max_query_len, max_seq_len, num_decodes, max_decode_seq_len, num_splits, fused_reduce, solo_tiles
    if append is not None:
        from aphrodite.kernels.rope_cache import rope_and_cache_ref
        q = q.clone()
        rope_and_cache_ref(append.positions, q, append.k.clone(), append.v, k_cache, v_cache,
                           append.slot_mapping, append.cos_sin_cache, k_scale, v_scale)
    page = k_cache.shape[1]
    hq, hkv = q.shape[1], k_cache.shape[2]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        q_len = e - s
        if q_len == 0:
            continue
        nblk = cdiv(seq_len, page)
        blocks = block_tables[i, :nblk].long()
        keys = k_cache[blocks].flatten(0, 1)[:seq_len].float() * k_scale      # [L, Hkv, D]
        vals = v_cache[blocks].flatten(0, 1)[:seq_len].float() * v_scale
        keys = keys.repeat_interleave(hq // hkv, dim=1)                # [L, Hq, D]
        vals = vals.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), keys) * scale
        if logits_soft_cap:
            scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
        qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        kpos = torch.arange(seq_len, device=q.device)[None, :]
        visible = kpos <= qpos  # [q_len, L]
        if sliding_window:
            visible &= kpos > qpos - sliding_window
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, vals).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

def _reshape_and_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_kv_heads,
                              stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                              k_inv_scale, v_inv_scale,
                              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
                              BLOCK_H: tl.constexpr, KV_FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0)
    blk = slot // PAGE
    off = slot % PAGE
    offs_d = tl.arange(0, D_PAD)
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, num_kv_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = valid & (heads < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
        kc = k_cache_ptr + blk * stride_kcb + off * stride_kct + heads[:, None] * stride_kch + offs_d[None, :]
        vc = v_cache_ptr + blk * stride_vcb + off * stride_vct + heads[:, None] * stride_vch + offs_d[None, :]
        if KV_FP8:
            k = tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -448.0), 448.0)   # e4m3 saturates
            v = tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -448.0), 448.0)
        tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
        qsl_ptr, seq_lens_ptr, block_tables_ptr,
        part_o_ptr, part_m_ptr, part_l_ptr, count_ptr,
        pos_ptr, slot_ptr, kn_ptr, vn_ptr, cs_ptr,
        qk_scale, num_seqs, num_q_heads, window, softcap, num_splits,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        stride_knt, stride_knh, stride_vnt, stride_vnh, stride_cs, k_scale, v_scale,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        DECODE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
        ROPE: tl.constexpr, HALF: tl.constexpr, FUSED_REDUCE: tl.constexpr, S_PAD: tl.constexpr,
        SOLO_TILES: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, KV_FP8: tl.constexpr = False):
    kv_head = tl.program_id(1)
    if DECODE:
        # One query token per sequence, and token index == sequence index.
        seq = tl.program_id(0)
        q_len = 1
        q_start = 0
        first_tok = seq
    else:
        # Sequence i owns programs [f(i), f(i+1)) with f(i) = (qsl[i] - qsl[0]) // BLOCK_Q + i, which is
        # at least cdiv(q_len_i, BLOCK_Q) programs; find i by binary search, surplus programs exit.
        pid = tl.program_id(0)
        base = tl.load(qsl_ptr)
        lo = pid * 0
        hi = lo + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            f = (tl.load(qsl_ptr + mid) - base) // BLOCK_Q + mid
            go_right = f <= pid
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(go_right, hi, mid)
        seq = lo - 1
        seq_q0 = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - seq_q0
        n_tiles = tl.cdiv(q_len, BLOCK_Q)
        local = pid - ((seq_q0 - base) // BLOCK_Q + seq)
        if local >= n_tiles:
            return
        # Last (longest, most keys) tiles first, so the long programs start early.
        q_start = (n_tiles - 1 - local) * BLOCK_Q
        first_tok = seq_q0 + q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    row_tok = offs_m // G
    head = kv_head * G + offs_m % G
    q_idx = q_start + row_tok
    row_ok = (row_tok < BLOCK_Q) & (q_idx < q_len)
    q_pos = ctx_len + q_idx
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    tok = (first_tok + row_tok).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Sliding window: keys below win_lo are outside every row's window (row i sees i - window < j <= i).
    win_lo = seq_len * 0
    if WINDOW:
        win_lo = tl.maximum(ctx_len + q_start - window + 1, 0)
    if SPLIT:
        split = tl.program_id(2)
        n_tiles = tl.cdiv(seq_len - win_lo, BLOCK_N)
        tiles_per_split = tl.maximum(tl.cdiv(n_tiles, num_splits), 1)
        # A short context goes to one program: merging splits costs more than its few serial tiles.
        tiles_per_split = tl.where(n_tiles <= SOLO_TILES, tl.maximum(n_tiles, 1), tiles_per_split)
        # Splits past the last tile hold no keys; with the in-kernel reduce they skip everything.
        n_active = tl.maximum(tl.cdiv(n_tiles, tiles_per_split), 1)
        if FUSED_REDUCE:
            if split >= n_active:
                return
        kv_lo = win_lo + split * tiles_per_split * BLOCK_N
        kv_hi = tl.minimum(seq_len, kv_lo + tiles_per_split * BLOCK_N)
        owner = (seq_len - 1 - win_lo) // BLOCK_N // tiles_per_split
    else:
        split = tl.program_id(2)   # always 0 here
        owner = 0
        kv_lo = win_lo
        kv_hi = tl.minimum(seq_len, ctx_len + q_start + BLOCK_Q)
    if ROPE:
        # Decode with the rotary prologue fused in: q and this step's k arrive un-rotated; rotate them
        # in registers (as rope_and_cache would), read keys [0, seq_len - 1) from the cache, and let
        # the split that owns position seq_len - 1 add the new token and write it to the cache.
        pos = tl.load(pos_ptr + seq).to(tl.int64)
        rot_ok = offs_d < 2 * HALF
        first = offs_d < HALF
        partner = tl.where(rot_ok, tl.where(first, offs_d + HALF, offs_d - HALF), offs_d)
        c_idx = tl.where(first, offs_d, offs_d - HALF)
        cos = tl.load(cs_ptr + pos * stride_cs + c_idx, mask=rot_ok, other=1.0).to(tl.float32)
        sin = tl.load(cs_ptr + pos * stride_cs + HALF + c_idx, mask=rot_ok, other=0.0).to(tl.float32)
        sin = tl.where(first, -sin, sin)
        q_pair = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + partner[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_pair.to(tl.float32) * sin[None, :]).to(q_ptr.dtype.element_ty)
        kn_row = kn_ptr + seq.to(tl.int64) * stride_knt + kv_head * stride_knh
        k_x = tl.load(kn_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        k_pair = tl.load(kn_row + partner, mask=d_ok, other=0.0).to(tl.float32)
        k_new = (k_x * cos + k_pair * sin).to(kn_ptr.dtype.element_ty)
        v_new = tl.load(vn_ptr + seq.to(tl.int64) * stride_vnt + kv_head * stride_vnh + offs_d,
                        mask=d_ok, other=0.0)
        if KV_FP8:   # the cache holds k / k_scale, v / v_scale; attend to what is stored, as later steps will
            k_new = tl.minimum(tl.maximum(k_new.to(tl.float32) / k_scale, -448.0), 448.0)
            v_new = tl.minimum(tl.maximum(v_new.to(tl.float32) / v_scale, -448.0), 448.0)
        k_new = k_new.to(k_cache_ptr.dtype.element_ty)
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)
        kv_hi = tl.minimum(kv_hi, seq_len - 1)
    # Keys below ctx_len + q_start + 1 are visible to every row of this tile.
    all_visible = tl.minimum(kv_hi, ctx_len + q_start + 1)
    full_hi = kv_lo + tl.maximum(all_visible - kv_lo, 0) // BLOCK_N * BLOCK_N
    # With a window, keys from the last row's window start on are also inside every row's window.
    full_lo = kv_lo
    if WINDOW:
        last_row_lo = ctx_len + tl.minimum(q_start + BLOCK_Q, q_len) - window
        full_lo = tl.minimum(kv_lo + tl.cdiv(tl.maximum(last_row_lo - kv_lo, 0), BLOCK_N) * BLOCK_N, full_hi)

    if KV_FP8:
        qk_cached = qk_scale * k_scale    # fp8 keys are k / k_scale: scale the scores instead of the keys
    else:
        qk_cached = qk_scale
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh

    for phase in tl.static_range(3):
        # phase 1: unmasked full tiles; phases 0 and 2: the (at most a few) tiles that need masking,
        # at the window's start (none without a window) and at the causal end.
        if phase == 0:
            n_lo = kv_lo
            n_hi = full_lo
        elif phase == 1:
            n_lo = full_lo
            n_hi = full_hi
        else:
            n_lo = full_hi
            n_hi = kv_hi
        for start in range(n_lo, n_hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            if phase == 1:
                blk = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
                kv_mask_t = d_ok[:, None]
                kv_mask = d_ok[None, :]
            else:
                n_ok = offs_n < n_hi
                blk = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
                kv_mask_t = d_ok[:, None] & n_ok[None, :]
                kv_mask = n_ok[:, None] & d_ok[None, :]
            in_page = offs_n % PAGE
            k_off = blk * stride_kb + in_page * stride_kt
            v_off = blk * stride_vb + in_page * stride_vt
            k_t = tl.load(k_head + k_off[None, :] + offs_d[:, None], mask=kv_mask_t, other=0.0)
            if KV_FP8:
                k_t = k_t.to(q.dtype)
            if IEEE:
                s = tl.dot(q, k_t, input_precision="ieee")
            else:
                s = tl.dot(q, k_t)
            s = s * qk_cached
            if SOFTCAP:   # cap * tanh(score / cap) in the base-2 units of qk_scale (softcap = cap * log2 e)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            if phase != 1:
                visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
                if WINDOW:
                    visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if KV_FP8:
                v = (v.to(tl.float32) * v_scale).to(q.dtype)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    if ROPE:
        if (split == owner) & (seq_len > 0):
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_cached
            if SOFTCAP:
                s_new = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s_new / softcap) + 1.0))
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            if KV_FP8:
                v_new_f = v_new.to(tl.float32) * v_scale
            else:
                v_new_f = v_new.to(tl.float32)
            acc = acc * alpha[:, None] + p_new[:, None] * v_new_f[None, :]
            m_i = m_new
            slot = tl.load(slot_ptr + seq).to(tl.int64)
            if slot >= 0:
                blk = slot // PAGE
                in_page = slot % PAGE
                tl.store(k_head + blk * stride_kb + in_page * stride_kt + offs_d, k_new, mask=d_ok)
                tl.store(v_head + blk * stride_vb + in_page * stride_vt + offs_d, v_new, mask=d_ok)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    st_mask = row_ok[:, None] & d_ok[None, :]
    out_rows = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if SPLIT:
        if FUSED_REDUCE:
            if n_active == 1:
                tl.store(out_rows, o.to(out_ptr.dtype.element_ty), mask=st_mask)
            else:
                idx = (seq * num_q_heads + head).to(tl.int64) * num_splits + split
                tl.store(part_o_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], o, mask=st_mask)
                tl.store(part_m_ptr + idx, m_i, mask=row_ok)
                tl.store(part_l_ptr + idx, l_i, mask=row_ok)
                # The last split of this (sequence, KV head) to finish merges the partials, so no
                # separate reduce launch; it also re-arms the counter for the next launch.
                tl.debug_barrier()
                cnt = count_ptr + seq * (num_q_heads // G) + kv_head
                done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                if done == n_active - 1:
                    tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
                    offs_s = tl.arange(0, S_PAD)
                    s_ok = offs_s < n_active
                    for gh in tl.static_range(G):
                        hh = kv_head * G + gh
                        base = (seq * num_q_heads + hh).to(tl.int64) * num_splits
                        pm = tl.load(part_m_ptr + base + offs_s, mask=s_ok, other=-1.0e30, cache_modifier=".cg")
                        pl = tl.load(part_l_ptr + base + offs_s, mask=s_ok, other=0.0, cache_modifier=".cg")
                        po = tl.load(part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                                     mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
                        w = pl * tl.exp2(pm - tl.max(pm, 0))
                        total = tl.sum(w, 0)
                        res = tl.sum(w[:, None] * po, 0) / tl.where(total > 0.0, total, 1.0)
                        tl.store(out_ptr + seq.to(tl.int64) * stride_ot + hh * stride_oh + offs_d,
                                 res.to(out_ptr.dtype.element_ty), mask=d_ok)
        else:
            idx = (seq * num_q_heads + head).to(tl.int64) * num_splits + split
            tl.store(part_o_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], o, mask=st_mask)
            tl.store(part_m_ptr + idx, m_i, mask=row_ok)
            tl.store(part_l_ptr + idx, l_i, mask=row_ok)
    else:
        tl.store(out_rows, o.to(out_ptr.dtype.element_ty), mask=st_mask)


def _split_kv_reduce_kernel(part_o_ptr, part_m_ptr, part_l_ptr, out_ptr, stride_ot, stride_oh, num_q_heads,
                            num_splits, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            D_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq * num_q_heads + head).to(tl.int64) * num_splits
    offs_s = tl.arange(0, S_PAD)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m = tl.load(part_m_ptr + base + offs_s, mask=s_ok, other=-1.0e30)
    lse = tl.load(part_l_ptr + base + offs_s, mask=s_ok, other=0.0)
    w = lse * tl.exp2(m - tl.max(m, 0))
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             res.to(out_ptr.dtype.element_ty), mask=d_ok)


_reshape_and_cache = LazyKernel(_reshape_and_cache_kernel)
_paged_attention = LazyKernel(_paged_attention_kernel)
_split_kv_reduce = LazyKernel(_split_kv_reduce_kernel)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter k/v [T, Hkv, D] into the paged cache at ``slot_mapping`` [T] (int; -1 = skip); an fp8
    cache gets ``k / k_scale``, ``v / v_scale``."""
    if not use_triton(k):
        reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    t, hkv, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert slot_mapping.shape[0] >= t
    d_pad = next_pow2(d)
    block_h = max(1, min(next_pow2(hkv), max(1, 2048 // d_pad)))
    _reshape_and_cache(k.device)[(t,)](
        k, v, k_cache, v_cache, slot_mapping, hkv,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 1.0 / k_scale, 1.0 / v_scale,
        HEAD_DIM=d, D_PAD=d_pad, PAGE=k_cache.shape[1], BLOCK_H=block_h, KV_FP8=_is_fp8(k_cache), num_warps=4)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Decode contexts of at most this many BLOCK_N tiles run in one program even when the launch has
# splits (graphs capture splits for the longest context). H100, 8B shapes, batch 1, per layer in a
# CUDA graph: 128 tokens 6.1 us in one program vs 11.4 us split with the merge; 384 tokens 11.3 vs 11.7
# (and 10.0 / 11.5 us for the unfused rotary + cache write + split attention + reduce).
DECODE_SOLO_TILES = 6


def choose_num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split-KV only when (sequence, KV head) programs alone would leave most SMs idle and the
    context is long enough that each split still streams >= 256 tokens; aims at ~2 programs per SM."""
    if num_decodes <= 0 or max_seq_len < 1024:
        return 1
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 132
    programs = num_decodes * num_kv_heads
    if programs >= sms:
        return 1
    splits = min(cdiv(2 * sms, programs), max_seq_len // 256, 64)
    return splits if splits >= 2 else 1


def _decode_tiles(g: int, d_pad: int, splits: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one-token-per-sequence programs: memory bound,
    so the padded query rows (tl.dot needs M >= 16) are free. 64-key tiles, 4 warps, 2 stages reached
    96% of the copy bandwidth for 256 decodes at context 1024 on an H100 (best of 6 configs). At head_dim
    256 (H200, Gemma-2-9B's shape) the same tiles read 256 decodes' KV at 4.37 TB/s against 4.10 with
    32-key tiles, but a split launch (small batches) wants 32-key tiles: more of its splits have a tile to
    read at short contexts (batch 1, contexts 129-384: 11.1 us a layer against 12.9-16.2 with 64)."""
    block_m = max(16, next_pow2(g))
    block_n = 64 if d_pad <= 128 or splits == 1 else 32
    return block_m, block_n, 4, 2


def decode_solo_tiles(d_pad: int) -> int:
    """``DECODE_SOLO_TILES`` for head_dim up to 128; at 256 a lone program streams twice the bytes per
    token, and splitting won from 129 tokens up (H200, batch 1: 10.1 vs 11.0 us at 129, 11.2 vs 16.0 at 192)."""
    return DECODE_SOLO_TILES if d_pad <= 128 else 2


def _prefill_tiles(g: int, d_pad: int, max_query_len: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N, num_warps, num_stages): rows = BLOCK_Q tokens x G heads, as many as
    the longest chunk needs up to 64 (128 at head_dim 256). On an H100 at Llama-8B shapes (8x1024 bf16
    prefill) 64x64 with 4 warps beat 128x64 with 8 warps by 12% (0.276 vs 0.314 ms). At head_dim 256 (H200,
    Gemma-2-9B's shape, 16 prompts of 1,024 tokens a layer) 128x64 with 8 warps ran 214 TFLOP/s against 94
    for 64x32 and 109 for 64x64: the taller tile halves the K/V passes that the wide head makes costly."""
    cap = 64 if d_pad <= 128 else 128
    block_m = max(16, next_pow2(g), min(cap, next_pow2(max(1, max_query_len) * g)))
    block_q = block_m // g
    if d_pad <= 128:
        return block_m, block_q, 64, 4, 2
    return block_m, block_q, 64, 8, 2


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 arrival counters for the in-kernel split-KV reduce, one per (sequence, KV head).

    Kept per device and re-armed by the kernel itself. Not grown during CUDA-graph capture (that
    would bake an allocation and a memset into the graph): then None, and the caller falls back to
    the separate reduce launch. Launches sharing them must be stream-ordered (one stream per device).
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_query_len: int, max_seq_len: int,
                    num_decodes: int | None = None, max_decode_seq_len: int | None = None,
                    num_splits: int | None = None, append: DecodeAppend | None = None,
                    fused_reduce: bool = True, solo_tiles: int | None = None,
                    sliding_window: int | None = None, logits_soft_cap: float | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Attention of q [T, Hq, D] over the paged cache (already holding this step's K/V) into out.

    ``num_decodes``: the first sequences with exactly one query token (token i = sequence i); they go
    to the decode launch. Default: all sequences when ``max_query_len == 1``, else none.
    ``num_splits``: split-KV factor for the decode launch (1 = off); default from
    ``choose_num_splits`` on ``max_decode_seq_len`` (or ``max_seq_len``). Every choice here uses
    Python ints only, and each kernel reads true lengths from the tensors, so any choice is correct.
    ``append`` (decode-only batches): q and this step's k are not yet rotated and the cache does not
    hold this step's k/v; the decode launch rotates both and writes k/v (q and k are left as given).
    ``fused_reduce``: merge split-KV partials in the attention launch (last split to finish) instead
    of a second launch. ``solo_tiles``: decode contexts of at most this many key tiles skip the split
    (default ``decode_solo_tiles``).
    ``sliding_window``: a query at position i sees keys ``i - window < j <= i``; keys before every row's
    window are not read. ``logits_soft_cap``: scores become ``cap * tanh(score / cap)`` (Gemma 2).
    Triton on CUDA (or under TRITON_INTERPRET), else ``paged_attention_ref``.
    """
    if not use_triton(q):
        return paged_attention_ref(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale,
                                   append=append, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                   k_scale=k_scale, v_scale=v_scale)
    t, hq, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    assert hq % hkv == 0, "query heads must be a multiple of KV heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    g = hq // hkv
    b = seq_lens.shape[0]
    if num_decodes is None:
        num_decodes = b if max_query_len == 1 else 0
    nd = num_decodes
    d_pad = next_pow2(max(d, 16))
    ieee = q.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E
    window = int(sliding_window or 0)
    softcap = float(logits_soft_cap or 0.0) * _LOG2E   # the kernel's scores are in base-2 units
    variant = dict(WINDOW=window > 0, SOFTCAP=softcap > 0)
    launch = _paged_attention(q.device)
    common = (q.stride(0), q.stride(1), out.stride(0), out.stride(1),
              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
              v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
    no_rope = (q, q, q, q, q)   # placeholders for the pointers of an ``append`` launch
    no_rope_strides = (0, 0, 0, 0, 0)
    if append is not None:
        assert nd == b == t, "append is for decode-only batches"
        ak, av, cs = append.k, append.v, append.cos_sin_cache
        assert ak.stride(-1) == 1 and av.stride(-1) == 1 and cs.stride(-1) == 1
        rot = cs.shape[-1]
        assert rot % 2 == 0 and rot <= d

    if nd > 0:
        if num_splits is None:
            dec_len = max_decode_seq_len if max_decode_seq_len is not None else max_seq_len
            num_splits = choose_num_splits(nd, hkv, dec_len, q.device)
        splits = max(1, int(num_splits))
        block_m, block_n, warps, stages = _decode_tiles(g, d_pad, splits)
        if solo_tiles is None:
            solo_tiles = decode_solo_tiles(d_pad)
        counters = _split_counters(q.device, nd * hkv) if splits > 1 and fused_reduce else None
        fused = counters is not None
        if splits > 1:
            part_o = torch.empty((nd, hq, splits, d), dtype=torch.float32, device=q.device)
            part_m = torch.empty((nd, hq, splits), dtype=torch.float32, device=q.device)
            part_l = torch.empty((nd, hq, splits), dtype=torch.float32, device=q.device)
        else:
            part_o = part_m = part_l = out  # unused
        if append is not None:
            rope_ptrs = (append.positions, append.slot_mapping, ak, av, cs)
            rope_strides = (ak.stride(0), ak.stride(1), av.stride(0), av.stride(1), cs.stride(0))
            half = rot // 2
        else:
            rope_ptrs, rope_strides, half = no_rope, no_rope_strides, 1
        launch[(nd, hkv, splits)](
            q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
            part_o, part_m, part_l, counters if fused else out, *rope_ptrs, qk_scale, nd, hq, window, softcap, splits,
            *common,
            *rope_strides, float(k_scale), float(v_scale),
            G=g, HEAD_DIM=d, D_PAD=d_pad, PAGE=page, BLOCK_M=block_m, BLOCK_Q=1, BLOCK_N=block_n,
            DECODE=True, SPLIT=splits > 1, IEEE=ieee, ROPE=append is not None, HALF=half,
            FUSED_REDUCE=fused, S_PAD=next_pow2(splits), SOLO_TILES=solo_tiles, KV_FP8=_is_fp8(k_cache),
            num_warps=warps, num_stages=stages, **variant)
        if splits > 1 and not fused:
            _split_kv_reduce(q.device)[(nd, hq)](
                part_o, part_m, part_l, out, out.stride(0), out.stride(1), hq, splits,
                S_PAD=next_pow2(splits), HEAD_DIM=d, D_PAD=d_pad, num_warps=4)

    if nd < b:
        nseq = b - nd
        block_m, block_q, block_n, warps, stages = _prefill_tiles(g, d_pad, max_query_len)
        grid0 = t // block_q + nseq
        launch[(grid0, hkv, 1)](
            q, k_cache, v_cache, out, query_start_loc[nd:], seq_lens[nd:], block_tables[nd:],
            out, out, out, out, *no_rope, qk_scale, nseq, hq, window, softcap, 1, *common, *no_rope_strides,
            float(k_scale), float(v_scale),
            G=g, HEAD_DIM=d, D_PAD=d_pad, PAGE=page, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
            DECODE=False, SPLIT=False, IEEE=ieee, ROPE=False, HALF=1, FUSED_REDUCE=False, S_PAD=1,
            SOLO_TILES=0, KV_FP8=_is_fp8(k_cache), num_warps=warps, num_stages=stages, **variant)
    return out


class TritonAttentionBackend:
    """Drop-in for ``TorchAttentionBackend``; ``Attention`` picks it for CUDA tensors.

    CUDA-graph safe for decode: no host syncs, launches depend only on shapes and meta's Python ints.
    The split-KV factor is fixed at capture from ``meta.max_decode_seq_len``, so capture decode graphs
    with the longest context they will replay (e.g. max_model_len) to get split-KV at small batch;
    any factor stays correct for any lengths at replay (splits past a short context exit at once).
    Padded decode rows may have seq_len 0 (their output is 0) and slot -1.
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, sliding_window: int | None = None,
                logits_soft_cap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]; writes k/v into the cache first (an fp8 cache
        with the layer's ``k_scale``/``v_scale``).

        ``rope = (positions, cos_sin_cache)``: q and k arrive un-rotated. A decode-only batch then
        rotates and appends inside the attention launch (one kernel per layer); any other batch
        uses one rotary + cache-write launch before attention.
        """
        append = None
        decode_only = meta.num_decodes == meta.seq_lens.shape[0] == q.shape[0]
        if rope is None:
            reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        elif decode_only and q.shape[0] > 0:
            append = DecodeAppend(rope[0], rope[1], k, v, meta.slot_mapping)
        else:
            from aphrodite.kernels.rope_cache import rope_and_cache
            rope_and_cache(rope[0], q, k, v, k_cache, v_cache, meta.slot_mapping, rope[1], k_scale, v_scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if q.shape[0] == 0 or meta.seq_lens.shape[0] == 0:
            return out
        paged_attention(q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                        scale, meta.max_query_len, meta.max_seq_len, num_decodes=meta.num_decodes,
                        max_decode_seq_len=meta.max_decode_seq_len, append=append, sliding_window=sliding_window,
                        logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale)
        return out
