"""Mixture-of-experts feed-forward: routing and the experts of one layer in a few Triton launches.

``fused_moe(x, router_logits, w13, w2, top_k, ...)`` is a layer's routed experts: ``select_experts``
(softmax or sigmoid scores, top-k, optional renormalisation: one kernel) then ``fused_experts``.
``fused_experts(x, w13, w2, topk_weights, topk_ids)`` computes, for every token ``t`` and each of its
``k`` chosen experts ``e`` with routing weight ``w``: ``sum_k w * down_e(act(gate_e(x_t)) * up_e(x_t))``.

Weights are stacked per expert in ``nn.Linear`` layout: ``w13 [E, 2I, H]`` (gate rows, then up rows)
and ``w2 [E, H, I]``.

GPU path (one launch per GEMM for all experts, as vLLM's Triton fused-MoE):
* ``moe_align_block_size``: the ``T * k`` (token, expert) pairs are sorted by expert and each
  expert's run is padded to a multiple of ``BLOCK_M``, so every ``BLOCK_M`` rows of the sorted list
  belong to one expert (``expert_ids`` per row block). No host sync, so a decode step can be captured
  in a CUDA graph. On CUDA (and under the interpreter) it is two launches (one program: histogram,
  prefix sums, each row block's expert; then a scatter with atomics) instead of the ~25 tensor ops
  of the CPU version. Tiles: vLLM's H200 table for E=128/top-8 keyed by pairs per
  expert, shrunk to the device's shared memory.
* ``_grouped_gemm``: program ``(row block, column block)`` multiplies its gathered rows of A by its
  expert's weight; row blocks past the padded total, and padding rows, do nothing. The first GEMM
  reads token rows (``pair // k``), the second reads the activation rows of the pairs and scales by
  the routing weight; the ``k`` partial outputs of a token are then summed.
* With few pairs (decode: ``T * k`` at most half the experts) no sorting and no tensor cores: two
  GEMV-shaped launches. ``_pair_gate_up``: program ``(pair, column block)`` reads its expert from
  ``topk_ids`` and computes gate and up columns together, writing ``act(gate) * up``;
  ``_token_down``: program ``(token, column block)`` reads the column block of all ``k`` experts of its
  token at once (a ``[k, BLOCK_N, BLOCK_K]`` tile, so enough bytes are in flight at batch 1), scales
  by the routing weights and sums them, writing the token's output row. Through ``fused_moe`` the
  first also does the routing (each program recomputes its token's top-k from the router logits, one
  packed max per round), so a decode step's MoE layer is the router GEMM and these two launches.

CPU path and oracle: ``fused_experts_ref``, a loop over the experts that received tokens.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from aphrodite.kernels.triton_utils import HAS_TRITON, DeviceFunction, LazyKernel, cdiv, next_pow2, tl, use_triton

__all__ = ["fused_experts", "fused_experts_ref", "fused_moe", "moe_align_block_size", "select_experts",
           "select_experts_ref"]

SCORING_FUNCTIONS = ("softmax", "sigmoid")


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


def select_experts_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                       scoring_func: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] float32, expert ids [T, k])``: the ``top_k`` highest-scoring experts per token,
    scores from a float32 softmax (or sigmoid) of the router logits, renormalized to sum 1 if asked."""
    logits = router_logits.float()
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"MoE scoring function {scoring_func!r} is not supported; supported: {SCORING_FUNCTIONS}")
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _topk_route_fn(logits_ptr, t, E, stride_l, TOPK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                   SIGMOID: tl.constexpr, RENORM: tl.constexpr):
    # Token t's (weights [BLOCK_K] fp32, expert ids [BLOCK_K] int32), entries past TOPK zero: scores, then
    # TOPK rounds of one max over (score bits << 32 | reversed index) keys (scores are >= 0, so their
    # bits order as integers; the lowest index wins a tie, as torch.topk), renormalised if asked.
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = tl.exp(x - tl.max(x, 0))
        p = tl.where(ok, p, 0.0)
        s = p / tl.sum(p, 0)
    s = tl.where(ok, s, -1.0)                    # negative bits: padding never wins
    key = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - offs).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        best = tl.max(key, 0)
        idx = BLOCK_E - 1 - best.to(tl.int32)   # the low 32 bits: the reversed index
        w = tl.where(offs_k == j, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), w)
        ids = tl.where(offs_k == j, idx, ids)
        key = tl.where(offs == idx, -9223372036854775807, key)
    if RENORM:
        w = w / tl.sum(w, 0)                     # entries past TOPK are 0
    return w, ids


_topk_route = DeviceFunction(_topk_route_fn) if HAS_TRITON else _topk_route_fn


def _select_experts_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_l,
                           TOPK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                           SIGMOID: tl.constexpr, RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    w, ids = _topk_route(logits_ptr, t, E, stride_l, TOPK, BLOCK_E, BLOCK_K, SIGMOID, RENORM)
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < TOPK
    tl.store(weights_ptr + t * TOPK + offs_k, w.to(weights_ptr.dtype.element_ty), mask=k_ok)
    tl.store(ids_ptr + t * TOPK + offs_k, ids, mask=k_ok)


_select_experts = LazyKernel(_select_experts_kernel)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax",
                   weight_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts_ref`` in one launch on CUDA (or under TRITON_INTERPRET): float32 scores, top-k,
    renormalisation, and the weights rounded once to ``weight_dtype`` (the experts' dtype, as HF casts
    them); ids are int32 there, int64 from the reference. A decode step otherwise spends ~6 small
    kernels per layer on routing."""
    if scoring_func not in SCORING_FUNCTIONS:
        raise ValueError(f"MoE scoring function {scoring_func!r} is not supported; supported: {SCORING_FUNCTIONS}")
    t, e = router_logits.shape
    if not use_triton(router_logits) or e > 4096 or top_k > e:
        weights, ids = select_experts_ref(router_logits, top_k, renormalize, scoring_func)
        return weights.to(weight_dtype), ids
    weights = torch.empty(t, top_k, dtype=weight_dtype, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t:
        logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
        _select_experts(logits.device)[(t,)](
            logits, weights, ids, e, logits.stride(0), TOPK=top_k, BLOCK_E=next_pow2(e),
            BLOCK_K=max(2, next_pow2(top_k)), SIGMOID=scoring_func == "sigmoid", RENORM=renormalize,
            num_warps=1 if e <= 256 else 4)
    return weights, ids


def _align_cap(n: int, block_m: int, num_experts: int) -> int:
    # Each expert pads at most block_m - 1 rows, and only experts that got a pair pad at all.
    cap = min(n + num_experts * (block_m - 1), n * block_m)
    return cdiv(max(cap, 1), block_m) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_pair_ids, expert_ids, num_padded)`` for the grouped GEMM.

    ``sorted_pair_ids [P]`` (int32): indices into the flat ``T * k`` pairs, grouped by expert, each
    group padded to a multiple of ``block_m`` with the value ``T * k`` (an invalid pair); unused tail
    entries hold it too. ``expert_ids [P // block_m]``: the expert of each row block (``num_experts``
    past the end). ``num_padded [1]``: the padded length in use. ``P`` depends only on shapes, and
    nothing syncs with the host, so a decode step can be captured in a CUDA graph. On CUDA the order of
    the pairs inside an expert's group is arbitrary (atomics); every row's result is the same either way.
    """
    if not use_triton(topk_ids):
        return _align_torch(topk_ids, block_m, num_experts)
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    cap = _align_cap(n, block_m, num_experts)
    cursors = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=device)
    expert_ids = torch.empty(cap // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    block_e = next_pow2(num_experts)
    _align_offsets(device)[(1,)](flat, cursors, sorted_ids, expert_ids, num_padded, n, num_experts, cap, block_m,
                                 BLOCK_E=block_e, BLOCK=1024, BLOCK_B=max(1, 4096 // block_e), num_warps=4)
    _align_scatter(device)[(cdiv(max(n, 1), 1024),)](flat, cursors, sorted_ids, n, BLOCK=1024)
    return sorted_ids, expert_ids, num_padded


def _align_offsets_kernel(ids_ptr, cursors_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, n, E, cap, block_m,
                          BLOCK_E: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    # One program: the pairs per expert (histograms of BLOCK pairs at a time), padded group starts
    # (written as the scatter's cursors), each row block's expert, the padded total, and every sorted
    # slot preset to the invalid pair n.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    offs = tl.arange(0, BLOCK)
    for p0 in range(0, n, BLOCK):
        ok = p0 + offs < n
        e = tl.load(ids_ptr + p0 + offs, mask=ok, other=0).to(tl.int32)
        counts += tl.histogram(e, BLOCK_E, mask=ok)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    padded = (counts + block_m - 1) // block_m * block_m
    ends = tl.cumsum(padded, 0)
    tl.store(cursors_ptr + offs_e, ends - padded, mask=e_ok)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    ends = tl.where(e_ok, ends, 2147483647)
    for b0 in range(0, cap // block_m, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        # searchsorted(ends, blk * block_m, right=True): how many groups end at or before the block.
        expert = tl.sum((ends[None, :] <= (blk * block_m)[:, None]).to(tl.int32), 1)
        tl.store(expert_ids_ptr + blk, expert, mask=blk < cap // block_m)
    for s0 in range(0, cap, BLOCK):
        tl.store(sorted_ids_ptr + s0 + offs, tl.full([BLOCK], 0, tl.int32) + n, mask=s0 + offs < cap)


def _align_scatter_kernel(ids_ptr, cursors_ptr, sorted_ids_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    e = tl.load(ids_ptr + offs, mask=ok, other=0)
    dest = tl.atomic_add(cursors_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=ok)
    tl.store(sorted_ids_ptr + dest, offs.to(tl.int32), mask=ok)


_align_offsets = LazyKernel(_align_offsets_kernel)
_align_scatter = LazyKernel(_align_scatter_kernel)


def _align_torch(topk_ids: torch.Tensor, block_m: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_align_block_size`` in tensor ops (the CPU path)."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    cap = _align_cap(n, block_m, num_experts)
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


def _act_mul_fn(gate, up, GELU: tl.constexpr):
    # act(gate) * up in fp32: SiLU, or GELU's tanh approximation (tanh(v) = 1 - 2 / (exp(2v) + 1)).
    if GELU:
        v = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        y = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)) * up
    else:
        y = gate / (1.0 + tl.exp(-gate)) * up
    return y


_act_mul = DeviceFunction(_act_mul_fn) if HAS_TRITON else _act_mul_fn


def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                         N, K, num_pairs, num_rows_cap,
                         stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                         A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         IEEE: tl.constexpr, FUSE_ACT: tl.constexpr = False, GELU: tl.constexpr = False,
                         EVEN_K: tl.constexpr = False):
    # FUSE_ACT (first GEMM): B's rows n and N + n are gate and up; two accumulators, and the tile
    # stores act(gate) * up, so the [pairs, 2I] intermediate and the activation launch disappear.
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
    # Columns past N wrap onto valid rows of B (their results are never stored), so B loads need no
    # column mask, and none at all when BLOCK_K divides K (EVEN_K), as vLLM's kernel does.
    b_cols = b_ptr + expert * stride_be + (offs_n % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_rows + (k0 + offs_k)[None, :] * stride_ak, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_cols + (k0 + offs_k)[:, None] * stride_bk)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_rows + (k0 + offs_k)[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(b_cols + (k0 + offs_k)[:, None] * stride_bk, mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if FUSE_ACT:
            if EVEN_K:
                bu = tl.load(b_cols + N * stride_bn + (k0 + offs_k)[:, None] * stride_bk)
            else:
                bu = tl.load(b_cols + N * stride_bn + (k0 + offs_k)[:, None] * stride_bk, mask=k_ok[:, None],
                             other=0.0)
            if IEEE:
                acc_up = tl.dot(a, bu, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, bu, acc_up)
    if FUSE_ACT:
        acc = _act_mul(acc, acc_up, GELU)
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    c = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


_grouped_gemm = LazyKernel(_grouped_gemm_kernel)


def _pair_gate_up_kernel(x_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, logits_ptr, n_inter, H, E, stride_xm,
                         stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_l, TOPK: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GELU: tl.constexpr, ROUTE: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr, SIGMOID: tl.constexpr,
                         RENORM: tl.constexpr):
    # Program (pair, column block): act(x_t . gate_e[n]) * (x_t . up_e[n]) for its BLOCK_N columns n.
    # ROUTE: the pair's expert comes from the token's router logits (top-k computed here; each pair's
    # column-block-0 program stores its weight and id for the down kernel), else from ids_ptr.
    pair = tl.program_id(0).to(tl.int64)
    token = pair // TOPK
    if ROUTE:
        w_all, ids_all = _topk_route(logits_ptr, token, E, stride_l, TOPK, BLOCK_E, BLOCK_TOPK, SIGMOID, RENORM)
        this = tl.arange(0, BLOCK_TOPK) == pair % TOPK
        expert = tl.sum(tl.where(this, ids_all, 0), 0).to(tl.int64)
        if tl.program_id(1) == 0:
            tl.store(weights_ptr + pair, tl.sum(tl.where(this, w_all, 0.0), 0).to(weights_ptr.dtype.element_ty))
            tl.store(ids_ptr + pair, expert.to(tl.int32))
    else:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_inter
    offs_k = tl.arange(0, BLOCK_K)
    gate_rows = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn
    up_rows = gate_rows + n_inter * stride_wn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < H
        a = tl.load(x_ptr + token * stride_xm + kk * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        m = n_ok[:, None] & k_ok[None, :]
        g = tl.load(gate_rows + kk[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        u = tl.load(up_rows + kk[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        acc_g += g * a[None, :]
        acc_u += u * a[None, :]
    gate = tl.sum(acc_g, 1)
    up = tl.sum(acc_u, 1)
    y = _act_mul(gate, up, GELU)
    tl.store(out_ptr + pair * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def _token_down_kernel(act_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, H, n_inter, stride_am, stride_we, stride_wn,
                       stride_wk, stride_om, TOPK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # Program (token, column block): sum_j w_j * (act_pair_j . down_e_j[n]) over the token's TOPK experts,
    # all of them loaded as one [BLOCK_J, BLOCK_N, BLOCK_K] tile per step.
    token = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    j_ok = offs_j < TOPK
    pairs = token * TOPK + offs_j
    experts = tl.load(ids_ptr + pairs, mask=j_ok, other=0).to(tl.int64)
    wts = tl.load(weights_ptr + pairs, mask=j_ok, other=0.0).to(tl.float32)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + experts[:, None, None] * stride_we + offs_n[None, :, None] * stride_wn
    a_rows = act_ptr + pairs[:, None] * stride_am
    acc = tl.zeros([BLOCK_J, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, n_inter, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < n_inter
        a = tl.load(a_rows + kk[None, :], mask=j_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        m = j_ok[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :]
        w = tl.load(w_rows + kk[None, None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        acc += w * a[:, None, :]
    y = tl.sum(tl.sum(acc, 2) * wts[:, None], 0)
    tl.store(out_ptr + token * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


_pair_gate_up = LazyKernel(_pair_gate_up_kernel)
_token_down = LazyKernel(_token_down_kernel)


def _small_batch_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                         ids: torch.Tensor, activation: str, gate_up_tile: tuple[int, int, int] = (16, 256, 4),
                         down_tile: tuple[int, int, int] = (16, 128, 8),
                         route: tuple[torch.Tensor, bool, str] | None = None) -> torch.Tensor:
    """Few pairs: two GEMV-shaped launches, no sort, activation and top-k sum fused (module docstring).
    Tiles are ``(BLOCK_N, BLOCK_K, num_warps)``; the defaults put ~3 and 1 programs on each of an H200's
    SMs at one token (Qwen3-30B-A3B), each streaming 16-32 KB per step. (An H200 sweep, ``bench_moe_gpu
    --sweep``, found (32, 256, 8) and (16, 256, 8) each ~10% faster alone; not yet measured end to end.)
    ``route = (router_logits, renormalize, scoring)``: the first kernel also does the routing, writing
    ``weights``/``ids`` ``[T, k]`` for the second."""
    t, k = ids.shape
    i, h = w2.shape[2], w2.shape[1]
    act = torch.empty(t * k, i, dtype=x.dtype, device=x.device)
    bn, bk, warps = gate_up_tile
    logits, renorm, scoring = route if route is not None else (x, False, "softmax")
    num_experts = w13.shape[0]
    _pair_gate_up(x.device)[(t * k, cdiv(i, bn))](
        x, w13, act, ids, weights, logits, i, x.shape[1], num_experts, x.stride(0), x.stride(1), w13.stride(0),
        w13.stride(1), w13.stride(2), act.stride(0), logits.stride(0), TOPK=k, BLOCK_N=bn,
        BLOCK_K=min(bk, max(16, next_pow2(x.shape[1]))), GELU=activation == "gelu", ROUTE=route is not None,
        BLOCK_E=next_pow2(num_experts), BLOCK_TOPK=max(2, next_pow2(k)), SIGMOID=scoring == "sigmoid",
        RENORM=renorm, num_warps=warps)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    block_j = max(2, next_pow2(k))
    bn, bk, warps = down_tile
    bn = max(2, bn * 8 // block_j) if block_j > 8 else bn   # keep the [k, BLOCK_N, BLOCK_K] tile's size
    _token_down(x.device)[(t, cdiv(h, bn))](
        act, w2, out, ids, weights, h, i, act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
        TOPK=k, BLOCK_J=block_j, BLOCK_N=bn, BLOCK_K=min(bk, max(16, next_pow2(i))), num_warps=warps)
    return out


#: The sorted path's first GEMM writes ``act(gate) * up`` itself (else a separate activation launch).
#: Off in the measured end-to-end runs; an H200 sweep found it 1-3% faster at 64-512 tokens (Qwen3-30B-A3B).
FUSE_ACT_IN_GEMM = False


def _use_gemv_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Few pairs: the GEMV-shaped path reads an expert once per pair, the sorted one once per expert; it
    runs while the pairs are at most half the experts. (On an H200, E=128 top-8, the sorted path was 7%
    faster at 8 tokens, so a quarter may be the better bound; not yet measured end to end.)"""
    return 2 * num_tokens * top_k <= num_experts


def _tiles(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by pairs per expert (vLLM's H200 table for
    Qwen3-30B-A3B's E=128, top-8 read that way): small row blocks while each expert gets few rows (the
    GEMM streams weights), wide ones for prefill."""
    per_expert = num_tokens * top_k / num_experts
    if per_expert <= 6:
        return 16, 64, 128, 4, 3
    if per_expert <= 12:
        return 16, 128, 128, 4, 2
    if per_expert <= 24:
        return 32, 256, 128, 4, 2
    if per_expert <= 48:
        return 64, 128, 64, 4, 3
    return 128, 256, 64, 8, 4


@functools.cache
def _smem_limit(device: torch.device) -> int:
    """Shared memory one program may use (bytes), less a margin for the epilogue's layout conversions."""
    if device.type != "cuda":
        return 227 * 1024 - 16 * 1024   # the interpreter: an H100/H200's, so tests see the same tiles
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024)) - 16 * 1024


def _fit_smem(tiles: tuple[int, int, int, int, int], elem_size: int,
              limit: int) -> tuple[int, int, int, int, int]:
    """Shrink a tile config until its pipelined A and B tiles fit ``limit`` (fp32 tests, smaller GPUs)."""
    bm, bn, bk, warps, stages = tiles
    while (bm * bk + bk * bn) * elem_size * stages > limit:
        if bk > 32:
            bk //= 2
        elif stages > 2:
            stages -= 1
        elif bn > 32:
            bn //= 2
        elif bm > 16:
            bm //= 2
        else:
            break
    return bm, bn, bk, warps, stages


def _launch(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
            routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_pairs: int, a_row_div: int,
            mul_weight: bool, block_m: int, block_n: int, block_k: int, warps: int, stages: int,
            fuse_act: str | None = None) -> None:
    """One grouped GEMM over ``routing`` (``moe_align_block_size``'s output); ``fuse_act`` ("silu" or
    "gelu"): ``w`` is w13 and ``c`` gets ``act(gate) * up`` (half the columns, two accumulators)."""
    n, k = w.shape[1] // (2 if fuse_act else 1), w.shape[2]
    sorted_ids, expert_ids, num_padded = routing
    rows = sorted_ids.shape[0]
    block_k = min(block_k, max(16, next_pow2(k)))
    grid = (cdiv(rows, block_m) * cdiv(n, block_n),)
    _grouped_gemm(a.device)[grid](
        a, w, c, weights, sorted_ids, expert_ids, num_padded, n, k, num_pairs, rows,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=mul_weight, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=8, IEEE=a.dtype == torch.float32, FUSE_ACT=fuse_act is not None,
        GELU=fuse_act == "gelu", EVEN_K=k % block_k == 0, num_warps=warps, num_stages=stages)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """MoE output ``[T, H]`` of ``x [T, H]``: Triton on CUDA (or under TRITON_INTERPRET), else the reference.

    ``topk_weights``/``topk_ids`` ``[T, k]``: each token's routing weights (any float dtype; applied in
    fp32) and experts (int32 or int64)."""
    if activation not in ("silu", "gelu"):
        raise ValueError(f"MoE activation {activation!r} is not supported; supported: silu, gelu")
    if not use_triton(x):
        return fused_experts_ref(x, w13, w2, topk_weights, topk_ids, activation)
    t, k = topk_ids.shape
    num_experts, two_i, h = w13.shape
    if t == 0:
        return torch.zeros(0, w2.shape[1], dtype=x.dtype, device=x.device)
    assert x.shape[1] == h and w2.shape[0] == num_experts and w2.shape[2] * 2 == two_i
    num_pairs = t * k
    flat_ids = topk_ids.reshape(-1)
    weights = topk_weights.reshape(-1)
    if not flat_ids.is_contiguous():
        flat_ids = flat_ids.contiguous()
    if not weights.is_contiguous():
        weights = weights.contiguous()
    if _use_gemv_path(t, k, num_experts):
        return _small_batch_experts(x, w13, w2, weights, flat_ids.view(t, k), activation)
    block_m, block_n, block_k, warps, stages = _fit_smem(_tiles(t, k, num_experts), x.element_size(),
                                                         _smem_limit(x.device))
    routing = moe_align_block_size(flat_ids, block_m, num_experts)
    if FUSE_ACT_IN_GEMM:   # half the columns per tile: two accumulators hold gate and up
        act = torch.empty(num_pairs, two_i // 2, dtype=x.dtype, device=x.device)
        _launch(x, w13, act, weights, routing, num_pairs, k, False, block_m, max(32, block_n // 2), block_k, warps,
                stages, fuse_act=activation)
    else:
        inter = torch.empty(num_pairs, two_i, dtype=x.dtype, device=x.device)
        _launch(x, w13, inter, weights, routing, num_pairs, k, False, block_m, block_n, block_k, warps, stages)
        if x.is_cuda:
            from aphrodite.kernels.activation import silu_and_mul
            act = silu_and_mul(inter, gelu=activation == "gelu")
        else:
            act = _act_and_mul(inter, activation)
    out = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _launch(act, w2, out, weights, routing, num_pairs, 1, True, block_m, block_n, block_k, warps, stages)
    return out.view(t, k, -1).sum(dim=1)


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
              renormalize: bool, scoring_func: str = "softmax", activation: str = "silu") -> torch.Tensor:
    """Routing and experts of one MoE layer: ``fused_experts(x, ..., *select_experts(router_logits, ...))``
    with the weights rounded to ``x.dtype`` (as HF casts them). With few pairs the routing runs inside the
    first experts kernel, so a decode step's layer is the router GEMM and two launches."""
    t = x.shape[0]
    num_experts = w13.shape[0]
    if (use_triton(x) and t and _use_gemv_path(t, top_k, num_experts) and num_experts <= 4096 and scoring_func in
            SCORING_FUNCTIONS and activation in ("silu", "gelu")):
        logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
        weights = torch.empty(t, top_k, dtype=x.dtype, device=x.device)
        ids = torch.empty(t, top_k, dtype=torch.int32, device=x.device)
        return _small_batch_experts(x, w13, w2, weights.view(-1), ids, activation,
                                    route=(logits, renormalize, scoring_func))
    weights, ids = select_experts(router_logits, top_k, renormalize, scoring_func, x.dtype)
    return fused_experts(x, w13, w2, weights, ids, activation)
