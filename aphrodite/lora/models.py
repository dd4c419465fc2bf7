"""Reading a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into host tensors.

An adapter becomes, per target module (HF names, e.g. ``model.layers.0.self_attn.q_proj``), the
pair ``(A [r, in], B [out, r])`` with the adapter's scaling (``lora_alpha / r``, or
``/ sqrt(r)`` with rsLoRA) folded into ``B``, so the kernels only multiply. Everything a user
can get wrong (a missing file, a rank above ``max_lora_rank``, a module the model cannot
adapt, PEFT features we do not run) is a ``ValueError`` with the reason.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from aphrodite.lora.request import LoRARequest

__all__ = ["LoRAAdapter", "load_adapter", "resolve_adapter_dir"]

_CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."


@dataclass
class LoRAAdapter:
    """One adapter's weights on the host, by HF module name."""

    lora_int_id: int
    lora_name: str
    rank: int                                   # the largest rank of any module
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def pin(self) -> LoRAAdapter:
        """Page-locked copies, so copies into device slots run asynchronously."""
        self.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in self.weights.items()}
        return self


def resolve_adapter_dir(path: str) -> str:
    """A local directory for ``path``: itself, or a hub id's snapshot (cache first, then download)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"LoRA adapter path {path!r} is a file; give the adapter's directory.")
    if path.startswith((".", "/")) or path.count("/") > 1:
        raise ValueError(f"LoRA adapter path {path!r} does not exist.")
    from huggingface_hub import snapshot_download
    patterns = [_CONFIG, *_WEIGHTS]
    try:
        return snapshot_download(path, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(path, allow_patterns=patterns,
                                 token=os.environ.get("HUGGINGFACE_HUB_TOKEN") or os.environ.get("HF_TOKEN"))
    except Exception as e:
        raise ValueError(f"LoRA adapter {path!r} is not a local directory and could not be downloaded from the "
                         f"Hugging Face hub ({type(e).__name__}: {e}).") from None


def _pattern_value(name: str, patterns: dict[str, float], default: float) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern``: a key matches a module name it ends."""
    for key, value in patterns.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def _read_tensors(directory: str) -> dict[str, torch.Tensor]:
    for fname in _WEIGHTS:
        p = os.path.join(directory, fname)
        if not os.path.isfile(p):
            continue
        if fname.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(p)
        return torch.load(p, map_location="cpu", weights_only=True)
    raise ValueError(f"No adapter_model.safetensors (or adapter_model.bin) in LoRA adapter directory {directory}.")


def load_adapter(request: LoRARequest, max_rank: int, supported: set[str], dtype: torch.dtype) -> LoRAAdapter:
    """Read and check ``request``'s adapter; ``supported`` are the HF module names the model can adapt."""
    directory = resolve_adapter_dir(request.lora_path)
    cfg_path = os.path.join(directory, _CONFIG)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"No {_CONFIG} in LoRA adapter directory {directory}.")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    name = request.lora_name
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"Adapter {name!r} is a {cfg.get('peft_type')} adapter; only LoRA is supported.")
    if cfg.get("use_dora"):
        raise ValueError(f"Adapter {name!r} uses DoRA, which is not supported.")
    if cfg.get("modules_to_save"):
        raise ValueError(f"Adapter {name!r} has modules_to_save {cfg['modules_to_save']}: full replacement "
                         "modules are not supported, only LoRA A/B weights.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"Adapter {name!r} trains biases (bias={cfg['bias']!r}); only bias='none' is supported.")
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora", False))
    alpha_pattern = cfg.get("alpha_pattern") or {}

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(directory).items():
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if k.endswith(".base_layer.weight"):
            # PEFT saves a copy of the base embedding / LM head beside their LoRA ("save_embedding_layers");
            # the base model's own weights are used (a resized vocabulary fails the shape check instead).
            continue
        for suffix, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                              (".lora_embedding_A", "A"), (".lora_embedding_B", "B")):
            if k.endswith(suffix):
                parts.setdefault(k[:-len(suffix)], {})[which] = tensor
                break
        else:
            raise ValueError(f"Adapter {name!r} holds an unexpected tensor {key!r}.")
    if not parts:
        raise ValueError(f"Adapter {name!r} has no LoRA weights.")
    unknown = sorted(m for m in parts if m not in supported)
    if unknown:
        shown = ", ".join(unknown[:4]) + (" ..." if len(unknown) > 4 else "")
        raise ValueError(f"Adapter {name!r} targets modules this model cannot apply LoRA to: {shown}.")

    adapter = LoRAAdapter(request.lora_int_id, name, 0)
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"Adapter {name!r} has lora_A without lora_B (or the reverse) for {module}.")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise ValueError(f"Adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                             "which do not fit together.")
        if rank > max_rank:
            raise ValueError(f"LoRA rank {rank} of adapter {name!r} is greater than max_lora_rank {max_rank}; "
                             "start the engine with a larger --max-lora-rank.")
        alpha = _pattern_value(module, alpha_pattern, alpha_default)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        adapter.weights[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
        adapter.rank = max(adapter.rank, rank)
    return adapter
