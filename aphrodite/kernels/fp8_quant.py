"""FP8 (e4m3) activation quantization and the W8A8 matmul it feeds.

``per_token_quant_fp8`` scales each row of ``x`` by its own ``amax / 448`` (dynamic, per token) or by a
given per-tensor scale (static, from a checkpoint's ``input_scale``) and rounds to float8_e4m3fn in one
launch (one program per row, read once when it fits in registers: up to 16k features). ``scaled_mm_fp8``
multiplies that by an fp8 weight with per-output-channel scales through ``torch._scaled_mm`` (rowwise
scaling: cuBLASLt/CUTLASS on Hopper); with ``APHRODITE_QUANT_TUNE=1`` a one-time CUDA-graph timing per rows
bucket and shape may pick ``_w8a8_kernel`` (Triton, split-K for decode batches) instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aphrodite.kernels.triton_utils import LazyKernel, cdiv, next_pow2, tl, use_triton

__all__ = ["FP8_DTYPE", "FP8_MAX", "W8A8Config", "per_token_quant_fp8", "per_token_quant_fp8_ref",
           "quantize_weight_fp8", "scaled_mm_fp8", "scaled_mm_fp8_ref", "tuned_w8a8_configs"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)   # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float ``[N, K]`` weight -> (fp8 ``[N, K]``, fp32 per-output-channel scales ``[N]``)."""
    amax = w.abs().amax(dim=1).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def per_token_quant_fp8_ref(x: torch.Tensor, static_scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], fp32 scales [M, 1])."""
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    else:
        scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm,
                            STATIC: tl.constexpr, BLOCK: tl.constexpr, FP8MAX: tl.constexpr,
                            MIN_SCALE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if BLOCK >= K:      # the whole row in registers: one read
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8MAX, MIN_SCALE)
        tl.store(s_ptr + row, scale)
        q = tl.minimum(tl.maximum(x * (1.0 / scale), -FP8MAX), FP8MAX)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.maximum(tl.max(amax, 0) / FP8MAX, MIN_SCALE)
        tl.store(s_ptr + row, scale)
        inv = 1.0 / scale
        for k0 in range(0, K, BLOCK):
            m = k0 + offs < K
            x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=m, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x * inv, -FP8MAX), FP8MAX)
            tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=m)


_per_token_quant = LazyKernel(_per_token_quant_kernel)


def per_token_quant_fp8(x: torch.Tensor, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (or static per-tensor) fp8 quantization of ``x [M, K]``; one launch on CUDA."""
    if not use_triton(x):
        return per_token_quant_fp8_ref(x, static_scale)
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(16384, next_pow2(k))        # rows up to 16k (all of Llama's) are read once
        _per_token_quant(x.device)[(m,)](
            x, q, s, static_scale if static_scale is not None else s, k, x.stride(0), q.stride(0),
            STATIC=static_scale is not None, BLOCK=block, FP8MAX=FP8_MAX, MIN_SCALE=_MIN_SCALE,
            num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return q, s


def scaled_mm_fp8_ref(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(xq * x_scale) @ (w * w_scale)^T in fp32: xq [M, K] fp8, x_scale [M, 1], w [N, K] fp8, w_scale [N]."""
    out = (xq.float() * x_scale) @ (w.float() * w_scale.float().reshape(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
                 M, N, K, tiles_per_split, num_splits, stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT: tl.constexpr, F32_DOT: tl.constexpr):
    """``(xq * xs) @ (w * ws)^T``: fp8 x fp8 tensor-core MMA into fp32, both scales applied once in the
    epilogue (K % BLOCK_K == 0). Split-K (partials + an arrival counter per output tile, summed in split
    order by the last program) fills the SMs where few output tiles exist, which ``torch._scaled_mm`` does
    not do at decode batch sizes. Rows / columns past ``M`` / ``N`` read row ``m % M`` / ``n % N``."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    k_lo = pid_k * tiles_per_split * BLOCK_K
    n_tiles = tl.minimum(tiles_per_split, K // BLOCK_K - pid_k * tiles_per_split)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, n_tiles):
        x = tl.load(x_ptrs)
        w = tl.load(w_ptrs)
        if F32_DOT:     # the CPU interpreter multiplies fp8 as raw bytes: widen first
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    m_ok = offs_m < M
    n_ok = offs_n < N
    o_mask = m_ok[:, None] & n_ok[None, :]
    o_off = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    scale = tl.load(xs_ptr + rows)[:, None] * tl.load(ws_ptr + cols).to(tl.float32)[None, :]
    if SPLIT:
        p_off = (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptr + p_off, acc, mask=o_mask)
        tl.debug_barrier()
        cnt = cnt_ptr + pid
        done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for sp in range(0, num_splits):
                p_off = (sp * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
                total += tl.load(part_ptr + p_off, mask=o_mask, other=0.0, cache_modifier=".cg")
            total = total * scale
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
            tl.store(out_ptr + o_off, total.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        res = acc * scale
        if HAS_BIAS:
            res += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        tl.store(out_ptr + o_off, res.to(out_ptr.dtype.element_ty), mask=o_mask)


_w8a8 = LazyKernel(_w8a8_kernel)


@dataclass(frozen=True)
class W8A8Config:
    """A launch shape of ``_w8a8_kernel``; ``cublas``: ``torch._scaled_mm`` instead. ``target``: programs per
    SM that split-K aims for."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    target: int = 1
    warps: int = 4
    stages: int = 4
    cublas: bool = False


def _w8a8_candidates(m: int) -> list[W8A8Config]:
    """``torch._scaled_mm`` first (the untuned default), then Triton shapes for decode batches."""
    if m > 256:
        return [W8A8Config(cublas=True), W8A8Config(128, 128, 128, target=1, warps=8, stages=3)]
    return [W8A8Config(cublas=True), W8A8Config(64, 128, 128, target=1), W8A8Config(64, 128, 128, target=2),
            W8A8Config(64, 64, 128, target=2), W8A8Config(128, 128, 128, target=1, warps=8, stages=3)]


def _launch_w8a8(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor | None, cfg: W8A8Config,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """Runs ``cfg`` and returns the product: into ``out`` for the Triton kernel, a new tensor from cuBLASLt."""
    from aphrodite.kernels.int4_matmul import _counters, _num_sms
    m, k = xq.shape
    n = w.shape[0]
    if cfg.cublas:
        res = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.float().reshape(1, -1),
                               out_dtype=out_dtype)
        return res if bias is None else res.add_(bias)
    assert out is not None
    k_tiles = k // cfg.block_k
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    splits = max(1, min(k_tiles, cdiv(cfg.target * _num_sms(xq.device), tiles), 32))
    per = cdiv(k_tiles, splits)
    splits = cdiv(k_tiles, per)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=xq.device) if splits > 1 else out
    cnt = _counters(xq.device, tiles) if splits > 1 else out
    ws = w_scale.reshape(-1)
    _w8a8(xq.device)[(tiles, splits)](
        xq, x_scale, w, ws, bias if bias is not None else ws, out, part, cnt, m, n, k, per, splits,
        xq.stride(0), w.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=splits > 1, F32_DOT=not xq.is_cuda,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out


_W8A8_TUNED: dict[tuple, W8A8Config] = {}


def _w8a8_config(xq: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> W8A8Config:
    """``torch._scaled_mm`` (the default), or with ``APHRODITE_QUANT_TUNE=1`` the faster of it and the Triton
    shapes for this (rows bucket, N, K), timed from a CUDA graph the first time a shape runs outside capture."""
    from aphrodite.kernels.int4_matmul import _rows_bucket, _time, _tuning_enabled
    m, k = xq.shape
    n = w.shape[0]
    rows = _rows_bucket(m)
    key = (rows, n, k, out_dtype, bias is not None)
    cfg = _W8A8_TUNED.get(key)
    if cfg is not None:
        return cfg
    cands = [c for c in _w8a8_candidates(rows) if c.cublas or k % c.block_k == 0]
    if not _tuning_enabled() or torch.cuda.is_current_stream_capturing():
        return cands[0]
    xs = torch.randn((rows, k), device=xq.device).to(xq.dtype)
    ss = torch.ones((rows, 1), device=xq.device)
    scratch = torch.empty((rows, n), dtype=out_dtype, device=xq.device)
    best, best_ms = cands[0], float("inf")
    for cand in cands:
        try:
            ms = _time(lambda c=cand: _launch_w8a8(xs, ss, w, w_scale, bias, scratch, c, out_dtype))
        except Exception:   # a shape the compiler or cuBLASLt rejects is skipped
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    _W8A8_TUNED[key] = best
    return best


def tuned_w8a8_configs() -> dict[tuple, W8A8Config]:
    """What the W8A8 tuner chose so far (printed by the GPU benchmark)."""
    return dict(_W8A8_TUNED)


def scaled_mm_fp8(xq: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                  config: W8A8Config | None = None) -> torch.Tensor:
    """W8A8 matmul with per-token activation and per-channel weight scales: on CUDA ``torch._scaled_mm`` (or,
    tuned, ``_w8a8_kernel``); the Triton kernel under the interpreter when ``config`` names it; else the
    reference."""
    if not xq.is_cuda and not (config is not None and not config.cublas and use_triton(xq)):
        return scaled_mm_fp8_ref(xq, x_scale, w, w_scale, out_dtype, bias)
    if not xq.shape[0]:
        return torch.empty((0, w.shape[0]), dtype=out_dtype, device=xq.device)
    cfg = config or _w8a8_config(xq, w, x_scale, w_scale, bias, out_dtype)
    out = None if cfg.cublas else torch.empty((xq.shape[0], w.shape[0]), dtype=out_dtype, device=xq.device)
    return _launch_w8a8(xq, x_scale, w, w_scale, bias, out, cfg, out_dtype)
