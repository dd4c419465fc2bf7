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

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None    # the model's (dynamic NTK, yarn/longrope defaults)
    attention_factor: float | None = None         # yarn/longrope: scales cos and sin
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None


def _rope_params(hf_config: Any, layer_type: str | None) -> dict[str, Any]:
    """This layer type's RoPE parameters: transformers 5 keeps one dict per layer type for models
    whose local and global layers rotate differently (Gemma 3), a single dict otherwise."""
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        params = params.get(layer_type or "full_attention") or next(iter(params.values()))
    return params


def get_rope_config(hf_config: Any, layer_type: str | None = None) -> RopeConfig:
    """RoPE settings from an HF config of either generation.

    transformers 5 puts everything in ``rope_parameters`` (with ``rope_theta`` inside, and one
    dict per layer type where they differ); older configs have ``rope_theta`` and an optional
    ``rope_scaling`` dict that names its kind ``rope_type`` or (older still) ``type``.
    """
    params = _rope_params(hf_config, layer_type)
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    orig = params.get("original_max_position_embeddings") or getattr(hf_config, "original_max_position_embeddings",
                                                                     None) or max_pos

    def opt(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    def factors(key: str) -> tuple[float, ...] | None:
        return None if params.get(key) is None else tuple(float(f) for f in params[key])

    factor = params.get("factor")
    if factor is None and rope_type in ("yarn", "longrope") and max_pos and orig:
        factor = max_pos / orig   # Phi-3 and DeepSeek derive it from the two lengths
    return RopeConfig(
        theta=float(theta), rope_type=rope_type, factor=float(factor or 1.0),
        low_freq_factor=float(params.get("low_freq_factor") or 1.0),
        high_freq_factor=float(params.get("high_freq_factor") or 4.0),
        original_max_position_embeddings=int(orig) if orig else None,
        max_position_embeddings=int(max_pos) if max_pos else None,
        attention_factor=opt("attention_factor"), beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0), mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)), short_factor=factors("short_factor"),
        long_factor=factors("long_factor"))


def _default_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def compute_inv_freq(rotary_dim: int, rope: RopeConfig) -> torch.Tensor:
    """float32 ``[rotary_dim // 2]`` inverse frequencies, scaled per ``rope.rope_type`` (for
    ``longrope`` the short-context set; the long one is ``_longrope_inv_freq(..., long=True)``)."""
    inv_freq = _default_inv_freq(rotary_dim, rope.theta)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    elif rope.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(rotary_dim, rope)
    elif rope.rope_type == "longrope":
        inv_freq = _longrope_inv_freq(rotary_dim, rope, long=False)
    return inv_freq


def attention_scaling(rope: RopeConfig) -> float:
    """The factor yarn and longrope apply to cos and sin (1 for the other types), as HF computes it."""
    if rope.attention_factor is not None or rope.rope_type not in ("yarn", "longrope"):
        return rope.attention_factor if rope.attention_factor is not None else 1.0
    factor = rope.factor
    if rope.rope_type == "longrope":
        orig = rope.original_max_position_embeddings
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if rope.mscale and rope.mscale_all_dim:
        return float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
    return mscale(factor)


def _yarn_inv_freq(dim: int, rope: RopeConfig) -> torch.Tensor:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, ramp linearly in between."""
    base, orig = rope.theta, rope.original_max_position_embeddings
    if orig is None:
        raise ValueError("yarn RoPE scaling needs original_max_position_embeddings")

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))
    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def _longrope_inv_freq(dim: int, rope: RopeConfig, long: bool) -> torch.Tensor:
    ext = rope.long_factor if long else rope.short_factor
    if ext is None or len(ext) != dim // 2:
        raise ValueError(f"longrope RoPE scaling needs short_factor and long_factor of {dim // 2} values each")
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(ext, dtype=torch.float32) * rope.theta ** shape)


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


def compute_cos_sin(rotary_dim: int, max_position: int, rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(cos, sin)``, each ``[max_position, rotary_dim // 2]``, of every position, as HF computes them.

    Two kinds depend on the context length in HF. ``longrope`` switches to its long factors once a
    sequence passes ``original_max_position_embeddings``; here positions past that length use them
    (exact while a sequence stays within it, and for every position after, as vLLM does).
    ``dynamic`` NTK rescales the base only past ``max_position_embeddings``; here position ``p`` there
    uses the base HF picks for a context of ``p + 1`` tokens.
    """
    t = torch.arange(max_position, dtype=torch.int64).to(torch.float32)
    freqs = t[:, None] * compute_inv_freq(rotary_dim, rope)[None, :]     # [P, D/2], as HF: pos * inv_freq
    if rope.rope_type == "longrope" and rope.original_max_position_embeddings is not None:
        orig = rope.original_max_position_embeddings
        if max_position > orig:
            freqs[orig:] = t[orig:, None] * _longrope_inv_freq(rotary_dim, rope, long=True)[None, :]
    elif rope.rope_type == "dynamic" and rope.max_position_embeddings and max_position > rope.max_position_embeddings:
        mp, f = rope.max_position_embeddings, rope.factor
        for p in range(mp, max_position):
            base = rope.theta * ((f * (p + 1) / mp) - (f - 1)) ** (rotary_dim / (rotary_dim - 2))
            freqs[p] = p * _default_inv_freq(rotary_dim, base)
    scale = attention_scaling(rope)
    return freqs.cos() * scale, freqs.sin() * scale


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table; ``cos_sin(positions)`` once per step, ``rotate`` per layer."""

    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.rope = rope
        dtype = torch.get_default_dtype()
        cos, sin = compute_cos_sin(head_dim, max_position, rope)
        # [P, 2, D]: row 0 = [cos, cos], row 1 = [-sin, sin]
        table = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)
        self.register_buffer("cos_sin_cache", table.to(dtype), persistent=False)
        # The fused GPU kernel reads [P, D] rows of (cos, sin) halves; built only where it runs.
        self.kernel_cache: torch.Tensor | None = None
        if torch.empty(0).is_cuda:
            self.kernel_cache = torch.cat([cos, sin], dim=-1).to(device=torch.empty(0).device, dtype=dtype)

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
