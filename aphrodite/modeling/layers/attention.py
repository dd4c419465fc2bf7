"""Attention over the paged KV cache behind one interface.

The model calls ``Attention.forward(q, k, v)``; the batch layout comes from the
``AttentionMetadata`` of the current step (set with ``set_attention_metadata``), so the
model's signature stays ``forward(input_ids, positions)`` and CUDA graphs can replay it.

KV cache layout, per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and V;
token ``i`` of a sequence lives in slot ``block_table[i // block_size] * block_size + i % block_size``.
Sequences in a batch are ordered decodes first (one query token each), then prefill chunks.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.kernels.attention_metadata import AttentionMetadata
from aphrodite.kernels.cpu import ops as cpu_ops

__all__ = ["Attention", "AttentionMetadata", "TorchAttentionBackend", "get_attention_metadata",
           "set_attention_metadata"]

# Per thread: the two halves of an overlapped tensor-parallel step run on two threads, each with its own layout.
_CURRENT = threading.local()


@contextlib.contextmanager
def set_attention_metadata(meta: AttentionMetadata) -> Iterator[None]:
    """Make ``meta`` the layout every ``Attention`` layer reads during one forward pass (on this thread)."""
    prev = getattr(_CURRENT, "meta", None)
    _CURRENT.meta = meta
    try:
        yield
    finally:
        _CURRENT.meta = prev


def get_attention_metadata() -> AttentionMetadata:
    meta = getattr(_CURRENT, "meta", None)
    assert meta is not None, "Attention called outside set_attention_metadata()"
    return meta


def is_fp8_cache(cache: torch.Tensor) -> bool:
    """Whether a KV cache tensor stores float8 (``--kv-cache-dtype fp8``; values are ``x / scale``)."""
    return cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def _to_cache(x: torch.Tensor, cache: torch.Tensor, kv_scale: float) -> torch.Tensor:
    """``x`` in the cache's storage: fp8 caches hold ``x / kv_scale`` (as raw bytes, for index_copy_)."""
    if not is_fp8_cache(cache):
        return x
    limit = torch.finfo(cache.dtype).max
    return (x.float() / kv_scale).clamp(-limit, limit).to(cache.dtype).view(torch.uint8)


def _from_cache(x: torch.Tensor, work: torch.Tensor | torch.dtype, kv_scale: float) -> torch.Tensor:
    """Cache values as ``work`` dtype: fp8 ones multiplied back by their scale."""
    dtype = work if isinstance(work, torch.dtype) else work.dtype
    if not is_fp8_cache(x):
        return x.to(dtype)
    return (x.float() * kv_scale).to(dtype)


def _fp8_in_c(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the C kernels read and write this (e4m3) fp8 cache for ``q``'s dtype."""
    return (q.device.type == "cpu" and cache.dtype == torch.float8_e4m3fn and q.shape[-1] <= 512
            and cpu_ops.available(q.dtype))


def _rotate_cpu(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Neox rotary with the CPU table ``[P, 2, D]`` (rows ``[cos, cos]`` and ``[-sin, sin]``)."""
    cs = table.index_select(0, positions)
    cos, sin = cs[:, 0:1].float(), cs[:, 1:2].float()
    xf = x.float()
    half = x.shape[-1] // 2
    return (xf * cos + torch.cat([xf[..., half:], xf[..., :half]], -1) * sin).to(x.dtype)


class TorchAttentionBackend:
    """Plain-PyTorch paged attention: the CPU path and the oracle for the Triton kernels."""

    @staticmethod
    def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        kf = k_cache.view(-1, *k_cache.shape[2:])
        vf = v_cache.view(-1, *v_cache.shape[2:])
        if is_fp8_cache(k_cache):
            kf, vf = kf.view(torch.uint8), vf.view(torch.uint8)
        if slot_mapping.numel() and bool((slot_mapping < 0).any()):
            keep = slot_mapping >= 0
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        kf.index_copy_(0, slot_mapping, _to_cache(k, k_cache, k_scale))
        vf.index_copy_(0, slot_mapping, _to_cache(v, v_cache, v_scale))

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, sliding_window: int | None = None,
                logits_soft_cap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]. With ``rope = (positions, cos_sin_cache)``
        q and k arrive un-rotated and are rotated here, in the same C pass as the cache write.
        ``sliding_window``: a query at position i sees keys j with ``i - window < j <= i`` (HF's rule);
        ``logits_soft_cap``: scores become ``cap * tanh(score / cap)`` before the softmax;
        ``k_scale``/``v_scale``: the layer's fp8 KV cache scales (unused for other cache dtypes)."""
        in_c = q.device.type == "cpu" and cpu_ops.available(q.dtype) and k_cache.dtype == q.dtype
        fp8_c = not in_c and _fp8_in_c(q, k_cache)
        if rope is not None and in_c:
            q, k = cpu_ops.rope_write_kv(q, k, v, rope[0], rope[1], k_cache, v_cache, meta.slot_mapping)
        else:
            if rope is not None:   # offered where the C kernels run, but they do not read this cache dtype
                q, k = _rotate_cpu(q, rope[0], rope[1]), _rotate_cpu(k, rope[0], rope[1])
            if in_c:
                cpu_ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            elif fp8_c:
                cpu_ops.write_kv_fp8(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
            else:
                TorchAttentionBackend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        window, cap = sliding_window or 0, logits_soft_cap or 0.0
        scales = (k_scale, v_scale)
        nd = meta.num_decodes
        if nd == meta.num_seqs == q.shape[0]:   # decode-only batch: no output buffer to fill
            return _decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.max_decode_seq_len, scale, window, cap, scales)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                         meta.seq_lens[:nd], meta.max_decode_seq_len, scale, window, cap, scales)
        starts, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        for i in range(nd, meta.num_seqs):
            s, e = starts[i], starts[i + 1]
            if e == s:
                continue
            out[s:e] = _prefill_attention(q[s:e], k[s:e], v[s:e], k_cache, v_cache,
                                          meta.block_tables[i], lens[i], scale, window, cap, scales)
        return out


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int, first_block: int = 0) -> torch.Tensor:
    """Tokens ``[first_block * block_size, length)`` of a sequence's K or V: [n, Hkv, D]."""
    bs = cache.shape[1]
    nblocks = (length + bs - 1) // bs
    blocks = cache.index_select(0, block_table[first_block:nblocks].long())   # [nblocks, bs, Hkv, D]
    return blocks.flatten(0, 1)[:length - first_block * bs]


def _attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None, scale: float,
            cap: float, is_causal: bool = False) -> torch.Tensor:
    """SDPA over ``[B, H, L, D]`` operands; with a soft cap, the same in explicit fp32 ops (SDPA has none)."""
    gqa = q.shape[1] != keys.shape[1]
    if not cap:
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        rep = q.shape[1] // keys.shape[1]
        keys, vals = keys.repeat_interleave(rep, dim=1), vals.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if is_causal:
        mask = torch.ones(q.shape[-2], keys.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vals.float()).to(q.dtype)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                      scale: float, window: int = 0, cap: float = 0.0,
                      kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """One query token per sequence, all sequences in one SDPA call padded to ``max_len``.

    K/V are gathered block-wise with one ``index_select`` (several times faster than
    advanced indexing on the CPU); padded slots (and those outside the window) are masked out of the softmax.
    """
    if q.device.type == "cpu" and cpu_ops.available(q.dtype) and k_cache.dtype == q.dtype:
        # Reads the paged cache in place: no gather, no padding, no dtype round trip.
        return cpu_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, window, cap)
    if _fp8_in_c(q, k_cache) and not window and not cap:   # the fp8 C kernel has no window or soft cap
        return cpu_ops.paged_decode_attention_fp8(q, k_cache, v_cache, block_tables, seq_lens, scale, *kv_scales)
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    nblocks = (max_len + bs - 1) // bs
    length = nblocks * bs
    idx = block_tables[:, :nblocks].reshape(-1).long()
    keys = k_cache.index_select(0, idx).view(b, length, hkv, d).transpose(1, 2)
    vals = v_cache.index_select(0, idx).view(b, length, hkv, d).transpose(1, 2)
    # Padded slots are masked out; they hold finite data because the model runner zero-fills
    # the pool, so 0 * garbage cannot turn into NaN.
    pos = torch.arange(length, device=q.device)[None, :]
    keep = pos < seq_lens[:, None]
    if window:
        keep &= pos >= seq_lens[:, None] - window
    # The CPU's half-precision SDPA is ~3x slower than fp32 at decode shapes: compute in fp32 there.
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    keys, vals = _from_cache(keys, work, kv_scales[0]), _from_cache(vals, work, kv_scales[1])
    out = _attend(q[:, :, None, :].to(work), keys, vals, keep[:, None, None, :], scale, cap)
    return out.view(b, hq, d).to(q.dtype)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                       scale: float, window: int = 0, cap: float = 0.0,
                       kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """A chunk of ``q_len`` new tokens attending causally to ``seq_len`` tokens (cached prefix + chunk);
    with a window, only the blocks holding keys some query of the chunk can see are read. An fp8 cache
    is read back (as the GPU kernels do) instead of using the chunk's own k/v."""
    q_len = q.shape[0]
    ctx = seq_len - q_len
    fp8 = is_fp8_cache(k_cache)
    if ctx == 0 and not window and not fp8:
        keys, vals = k, v
        mask = None
    else:
        bs = k_cache.shape[1]
        first_block = max(0, ctx - window + 1) // bs if window else 0
        start = first_block * bs
        if ctx == 0 and not fp8:
            keys, vals = k, v
        else:
            keys = _from_cache(_gather_kv(k_cache, block_table, seq_len, first_block), q, kv_scales[0])
            vals = _from_cache(_gather_kv(v_cache, block_table, seq_len, first_block), q, kv_scales[1])
        qpos = torch.arange(ctx, seq_len, device=q.device)[:, None]
        kpos = torch.arange(start, seq_len, device=q.device)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
    # The CPU's fused (flash) SDPA kernel takes only 4-D fp32 input; anything else falls back to
    # the reference path, which expands GQA heads with copies and is several times slower.
    work = torch.float32 if q.device.type == "cpu" else q.dtype
    out = _attend(q.transpose(0, 1)[None].to(work), keys.transpose(0, 1)[None].to(work),
                  vals.transpose(0, 1)[None].to(work), mask, scale, cap, is_causal=mask is None)
    return out[0].transpose(0, 1).to(q.dtype)


def _backend_for(q: torch.Tensor) -> type:
    """Triton kernels on CUDA, plain PyTorch elsewhere."""
    if q.is_cuda:
        from aphrodite.kernels.paged_attention import TritonAttentionBackend
        return TritonAttentionBackend
    return TorchAttentionBackend


class Attention(nn.Module):
    """Multi-head (grouped-query) attention over this layer's slice of the paged KV cache."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.sliding_window = sliding_window or None      # keys within this many positions (HF's rule)
        self.logits_soft_cap = logits_soft_cap or None    # Gemma 2: cap * tanh(score / cap)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        # Bound by the model runner once the cache is allocated.
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # fp8 KV cache: stored values are k / k_scale and v / v_scale (a checkpoint's, else 1.0).
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``rope = (positions, cos/sin table)``: q/k are not rotated yet; the backend rotates them in
        the same launch (GPU) or C pass (CPU) as the cache write, see ``RotaryEmbedding.fused_rope``."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        meta = get_attention_metadata()
        assert self.kv_cache is not None, "KV cache not bound to the attention layer"
        k_cache, v_cache = self.kv_cache
        extra = {"k_scale": self.k_scale, "v_scale": self.v_scale} if is_fp8_cache(k_cache) else {}
        out = _backend_for(q).forward(q, k, v, k_cache, v_cache, meta, self.scale, rope=rope,
                                      sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap,
                                      **extra)
        return out.reshape(t, self.num_heads * self.head_dim)
