"""Checkpoint writers for the tests, from each tool's published format (independent of our loaders).

* AutoAWQ ``WQLinear_GEMM.from_linear``: ``qweight [in, out/8]`` with nibble ``i`` holding output
  ``order_map[i]`` of each eight, ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``; ``qzeros`` packed the same way;
  ``scales [in/G, out]`` fp16.
* AutoGPTQ ``QuantLinear.pack``: ``qweight [in/8, out]`` (input row ``8i + j`` in nibble ``j`` of row ``i``),
  ``qzeros [in/G, out/8]`` holding ``zero - 1`` (format ``gptq``), ``scales [in/G, out]``, ``g_idx [in]``.
* compressed-tensors: its own ``pack_to_int32`` (the library is the reference).
"""
from __future__ import annotations

import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_groups(w: torch.Tensor, group: int, sym: bool, g_idx: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 of ``w [out, in]`` per (output, group): codes [out, in] 0..15, scales and
    integer zeros [out, groups] (symmetric: zero 8). ``g_idx`` assigns input columns to groups."""
    out_f, in_f = w.shape
    g_idx = torch.arange(in_f) // group if g_idx is None else g_idx.long()
    groups = int(g_idx.max()) + 1
    scales = torch.empty(out_f, groups, dtype=torch.float64)
    zeros = torch.empty(out_f, groups, dtype=torch.float64)
    w = w.double()
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            scales[:, g] = cols.abs().amax(1).clamp_min(1e-6) / 7.5
            zeros[:, g] = 8
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scales[:, g] = ((hi - lo) / 15).clamp_min(1e-6)
            zeros[:, g] = (-lo / scales[:, g]).round().clamp(0, 15)
    scales = scales.half().double()              # checkpoints store fp16 scales
    codes = (w / scales[:, g_idx] + zeros[:, g_idx]).round().clamp(0, 15)
    return codes.to(torch.int32), scales, zeros.to(torch.int32)


def dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """float64 ``[out, in]`` weight the codes stand for."""
    g = g_idx.long()
    return (codes.double() - zeros[:, g].double()) * scales[:, g]


def _pack_rows_of_eight(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """int codes [R, C] -> int32 [R, C/8]: nibble i of word c holds column 8c + order[i]."""
    r, c = values.shape
    out = torch.zeros(r, c // 8, dtype=torch.int64)
    for col in range(c // 8):
        for i in range(8):
            out[:, col] |= (values[:, col * 8 + order[i]].long() & 0xF) << (4 * i)
    return _to_int32(out)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_awq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of one layer (codes/zeros/scales as ``quantize_groups`` returns them)."""
    return {"qweight": _pack_rows_of_eight(codes.t(), AWQ_ORDER_MAP),
            "qzeros": _pack_rows_of_eight(zeros.t(), AWQ_ORDER_MAP),
            "scales": scales.t().contiguous().half()}


def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              v2: bool = False) -> dict[str, torch.Tensor]:
    """AutoGPTQ tensors of one layer (``v2``: GPTQModel's format, zero points without the minus one)."""
    intweight = codes.t().long()                                   # [in, out]
    k, n = intweight.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(k // 8):
        for j in range(8):
            qweight[i] |= (intweight[8 * i + j] & 0xF) << (4 * j)
    stored_zeros = zeros.t() - (0 if v2 else 1)                     # [groups, out]
    return {"qweight": _to_int32(qweight), "qzeros": _pack_rows_of_eight(stored_zeros, list(range(8))),
            "scales": scales.t().contiguous().half(), "g_idx": g_idx.to(torch.int32)}


def pack_compressed_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, sym: bool
                            ) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import pack_to_int32
    out = {"weight_packed": pack_to_int32((codes - 8).to(torch.int8), 4, packed_dim=1),
           "weight_scale": scales.half(), "weight_shape": torch.tensor(list(codes.shape))}
    if not sym:
        out["weight_zero_point"] = pack_to_int32((zeros - 8).to(torch.int8), 4, packed_dim=0)
    return out


def quantize_fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 weight and per-row float32 scales (amax / 448)."""
    scale = (w.double().abs().amax(1) / 448.0).float()
    return (w.double() / scale.double()[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def quantize_fp8_block(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 weight and ``[out/bn, in/bk]`` float32 block scales (DeepSeek/Qwen3 ``weight_scale_inv``)."""
    n, k = w.shape
    blocks = w.double().reshape(n // bn, bn, k // bk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).float()
    q = (blocks / scale.double()[:, None, :, None]).clamp(-448, 448).reshape(n, k).to(torch.float8_e4m3fn)
    return q, scale


def dequant_fp8_block(q: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    return q.double() * scale.double().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
