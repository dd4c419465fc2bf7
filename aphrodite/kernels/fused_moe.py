"""Mixture-of-experts feed-forward: a Triton grouped GEMM over tokens sorted by expert.

``fused_experts(x, w13, w2, topk_weights, topk_ids)`` computes, for every token ``t`` and each of its
``k`` chosen experts ``e`` with routing weight ``w``: ``sum_k w * down_e(act(gate_e(x_t)) * up_e(x_t))``.

Weights are stacked per expert in ``nn.Linear`` layout: ``w13 [E, 2I, H]`` (gate rows, then up rows)
and ``w2 [E, H, I]``.

GPU path (one launch per GEMM for all experts, as vLLM's Triton fused-MoE):
* ``moe_align_block_size``: the ``T * k`` (token, expert) pairs are sorted by expert and each
  expert's run is padded to a multiple of ``BLOCK_M``, so every ``BLOCK_M`` rows of the sorted list
  belong to one expert (``expert_ids`` per row block). Pure tensor ops, no host sync, so a decode
  step can be captured in a CUDA graph.
* With few pairs (decode: ``T * k`` at most half the experts) no sorting at all: row block ``i`` is
  pair ``i`` and reads its expert from ``topk_ids``.
* ``_grouped_gemm``: program ``(row block, column block)`` multiplies its gathered rows of A by its
  expert's weight; row blocks past the padded total, and padding rows, do nothing. The first GEMM
  reads token rows (``pair // k``), the second reads the activation rows of the pairs and scales by
  the routing weight; the ``k`` partial outputs of a token are then summed.

CPU path and oracle: ``fused_experts_ref``, a loop over the experts that received tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aphrodite.kernels.triton_utils import LazyKernel, cdiv, next_pow2, tl, use_triton

__all__ = ["fused_experts", "fused_experts_ref", "moe_align_block_size"]


def _act_and_mul(h: torch.Tensor, activation: str) -> torch.Tensor:
    d = h.shape[-1] // 2
    if activation == "silu":
        return F.silu(h[..., :d]) * h[..., d:]
    if activation == "gelu":
        return F.gelu(h[..., :d], approximate="tanh") * h[..., d:]
    raise ValueError(f"MoE activation {activation!r} is not supported; supported: silu, gelu")


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``[T, H]`` MoE output computed expert by expert (the arithmetic of HF's eager experts)."""
    t, k = topk_ids.shape
    out = torch.zeros(t, w2.shape[1], dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    weights = topk_weights.reshape(-1).to(x.dtype)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // k
        h = _act_and_mul(F.linear(x.index_select(0, tokens), w13[e]), activation)
        y = F.linear(h, w2[e]) * weights.index_select(0, pairs)[:, None]
        out.index_add_(0, tokens, y)
    return out


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_pair_ids, expert_ids, num_padded)`` for the grouped GEMM.

    ``sorted_pair_ids [P]`` (int32): indices into the flat ``T * k`` pairs, grouped by expert, each
    group padded to a multiple of ``block_m`` with the value ``T * k`` (an invalid pair); unused tail
    entries hold it too. ``expert_ids [P // block_m]``: the expert of each row block (``num_experts``
    past the end). ``num_padded [1]``: the padded length in use. ``P`` depends only on shapes.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    # Each expert pads at most block_m - 1 rows, and only experts that got a pair pad at all.
    cap = min(n + num_experts * (block_m - 1), n * block_m)
    cap = cdiv(max(cap, 1), block_m) * block_m
    # scatter_add rather than bincount: bincount sizes its output on the host (a sync, no CUDA graph).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    dest = starts[sorted_experts] + torch.arange(n, device=device) - first_of_expert[sorted_experts]
    sorted_ids = torch.full((cap,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, cap, block_m, device=device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                         N, K, num_pairs, num_rows_cap,
                         stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                         A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         IEEE: tl.constexpr, PER_PAIR: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows_cap, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks walk the columns together, so weight tiles stay in L2.
    per_group = GROUP_M * num_pid_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    if PER_PAIR:
        # Few pairs (decode): row block i is pair i alone, its expert read from topk_ids directly, so
        # routing needs no sort at all (two pairs on one expert read its weights twice, rarely).
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs).to(tl.int64)
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    row_ok = pair < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (pair // A_ROW_DIV)[:, None] * stride_am
    b_cols = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_rows + (k0 + offs_k)[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + (k0 + offs_k)[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    c = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


_grouped_gemm = LazyKernel(_grouped_gemm_kernel)


def _tiles(num_pairs: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small row blocks at decode (few pairs per
    expert, the GEMM streams weights), larger ones for prefill."""
    if num_pairs <= 64:
        return 16, 64, 128, 4, 4
    if num_pairs <= 4096:
        return 32, 64, 64, 4, 3
    return 64, 128, 64, 8, 3


def _launch(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
            routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, topk_ids: torch.Tensor, num_pairs: int,
            a_row_div: int, mul_weight: bool, block_m: int, block_n: int, block_k: int, warps: int,
            stages: int) -> None:
    """``routing``: ``moe_align_block_size``'s output, or None for one row block per pair."""
    n, k = w.shape[1], w.shape[2]
    if routing is None:
        sorted_ids = num_padded = expert_ids = topk_ids
        rows = num_pairs * block_m
    else:
        sorted_ids, expert_ids, num_padded = routing
        rows = sorted_ids.shape[0]
    grid = (cdiv(rows, block_m) * cdiv(n, block_n),)
    _grouped_gemm(a.device)[grid](
        a, w, c, weights, sorted_ids, expert_ids, num_padded, n, k, num_pairs, rows,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=mul_weight, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=min(block_k, max(16, next_pow2(k))), GROUP_M=8, IEEE=a.dtype == torch.float32,
        PER_PAIR=routing is None, num_warps=warps, num_stages=stages)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """MoE output ``[T, H]`` of ``x [T, H]``: Triton on CUDA (or under TRITON_INTERPRET), else the reference.

    ``topk_weights``/``topk_ids`` ``[T, k]``: each token's routing weights and experts."""
    if not use_triton(x):
        return fused_experts_ref(x, w13, w2, topk_weights, topk_ids, activation)
    t, k = topk_ids.shape
    num_experts, two_i, h = w13.shape
    if t == 0:
        return torch.zeros(0, w2.shape[1], dtype=x.dtype, device=x.device)
    assert x.shape[1] == h and w2.shape[0] == num_experts and w2.shape[2] * 2 == two_i
    num_pairs = t * k
    block_m, block_n, block_k, warps, stages = _tiles(num_pairs, two_i, h)
    flat_ids = topk_ids.reshape(-1).contiguous()
    routing = None if num_pairs * 2 <= num_experts else moe_align_block_size(topk_ids, block_m, num_experts)
    weights = topk_weights.reshape(-1).contiguous()
    inter = torch.empty(num_pairs, two_i, dtype=x.dtype, device=x.device)
    _launch(x, w13, inter, weights, routing, flat_ids, num_pairs, k, False, block_m, block_n, block_k, warps,
            stages)
    if activation == "silu" and x.is_cuda:
        from aphrodite.kernels.activation import silu_and_mul
        act = silu_and_mul(inter)
    else:
        act = _act_and_mul(inter, activation)
    out = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _launch(act, w2, out, weights, routing, flat_ids, num_pairs, 1, True, block_m, block_n, block_k, warps,
            stages)
    return out.view(t, k, -1).sum(dim=1)
