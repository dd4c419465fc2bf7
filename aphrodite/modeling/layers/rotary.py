"""Rotary position embedding, neox style (rotate halves), as Hugging Face Llama applies it.

cos/sin for every position up to ``max_position`` are computed once in float32 (the same
arithmetic as HF, so fp32 results match bit for bit) and stored in the model dtype. A step
gathers its rows by ``positions`` once and every layer reuses them.

The rotation ``x*cos + rotate_half(x)*sin`` is done as ``x*cos + roll(x)*sin_signed`` with
``sin_signed = [-sin, sin]``: the same products, three fewer ops per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aphrodite.kernels.cpu import ops as cpu_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


def get_rope_config(hf_config: Any) -> RopeConfig:
    """RoPE settings from an HF config of either generation.

    transformers 5 puts everything in ``rope_parameters`` (with ``rope_theta`` inside);
    older configs have ``rope_theta`` and an optional ``rope_scaling`` dict that names its
    kind ``rope_type`` or (older still) ``type``.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    orig = (params.get("original_max_position_embeddings")
            or getattr(hf_config, "original_max_position_embeddings", None)
            or getattr(hf_config, "max_position_embeddings", None))
    return RopeConfig(
        theta=float(theta), rope_type=rope_type, factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor") or 1.0),
        high_freq_factor=float(params.get("high_freq_factor") or 4.0),
        original_max_position_embeddings=int(orig) if orig else None)


def compute_inv_freq(rotary_dim: int, rope: RopeConfig) -> torch.Tensor:
    """float32 ``[rotary_dim // 2]`` inverse frequencies, scaled per ``rope.rope_type``."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies by ``factor``, keep high ones, blend in between."""
    if rope.original_max_position_embeddings is None:
        raise ValueError("llama3 RoPE scaling needs original_max_position_embeddings")
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table; ``cos_sin(positions)`` once per step, ``rotate`` per layer."""

    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.rope = rope
        dtype = torch.get_default_dtype()
        inv_freq = compute_inv_freq(head_dim, rope)
        t = torch.arange(max_position, dtype=torch.int64).to(torch.float32)
        freqs = t[:, None] * inv_freq[None, :]                 # [P, D/2], as HF: pos * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        # [P, 2, D]: row 0 = [cos, cos], row 1 = [-sin, sin]
        table = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)
        self.register_buffer("cos_sin_cache", table.to(dtype), persistent=False)
        # The fused GPU kernel reads [P, D] rows of (cos, sin) halves; built only where it runs.
        self.kernel_cache: torch.Tensor | None = None
        if torch.empty(0).is_cuda:
            from aphrodite.kernels.rotary import build_cos_sin_cache
            self.kernel_cache = build_cos_sin_cache(inv_freq.to(torch.empty(0).device), max_position, dtype)

    def prepare(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-step state for ``rotate_qk``: positions, plus gathered cos/sin rows on the torch path
        (none where the attention backend rotates q/k itself, see ``fused_rope``)."""
        if positions.is_cuda and self.kernel_cache is not None:
            return positions, None, None
        if positions.device.type == "cpu" and self.head_dim <= 512 and cpu_ops.available(self.cos_sin_cache.dtype):
            return positions, None, None
        cos, sin = self.cos_sin(positions)
        return positions, cos, sin

    def fused_rope(self, state: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(positions, cos/sin table)`` when the attention backend should rotate q/k itself, fused
        with its cache write (GPU: one launch per layer instead of two; CPU: one C pass), else None.
        The GPU table is the kernel's ``[P, D]`` (cos, sin) rows, the CPU one ``cos_sin_cache``."""
        positions, cos, _ = state
        if cos is not None:
            return None
        return positions, self.kernel_cache if positions.is_cuda else self.cos_sin_cache

    def rotate_qk(self, qk: torch.Tensor, q_size: int,
                  state: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the q and k parts of ``qk [T, q_size + kv_size]``; returns (q, k).

        On the GPU one fused kernel rotates both in place; on the CPU both are rotated in one
        set of torch ops (they sit side by side), then split.
        """
        positions, cos, sin = state
        if cos is None:
            from aphrodite.kernels.rotary import rotary_embedding
            q, k = qk[:, :q_size], qk[:, q_size:]
            return rotary_embedding(positions, q, k, self.head_dim, self.kernel_cache)
        out = self.rotate(qk, cos, sin)
        return out[:, :q_size], out[:, q_size:]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin_signed)`` for ``positions [T]``, each ``[T, 1, D]`` (broadcast over heads)."""
        cs = self.cos_sin_cache.index_select(0, positions)
        return cs[:, 0:1], cs[:, 1:2]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [T, n*D]`` (any number of heads) -> new contiguous ``[T, n*D]``."""
        t = x.shape[0]
        h = x.view(t, -1, self.head_dim)
        out = torch.addcmul(h * cos, torch.roll(h, self.head_dim // 2, -1), sin)
        return out.view(t, -1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position={self.max_position}, rope={self.rope}"
