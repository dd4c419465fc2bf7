"""Small helpers the quantization formats share: reading settings and matching ignored layers."""
from __future__ import annotations

import re
from typing import Any

# Our fused layers and the checkpoint projections they hold (ignore lists name the projections).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def get_any(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` present in ``config`` (tools spell the same setting differently)."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    return default


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or name.startswith(pattern + ".")


def is_layer_ignored(prefix: str, ignore: list[str]) -> bool:
    """Whether the layer ``prefix`` is left unquantized by an ignore list (exact names, dotted suffixes or
    ``re:`` patterns). A fused layer is ignored when all its projections are; a mix is an error."""
    if not ignore:
        return False
    head, _, last = prefix.rpartition(".")
    parts = _FUSED.get(last)
    if parts is None:
        return any(_matches(prefix, p) for p in ignore)
    flags = [any(_matches(f"{head}.{part}", p) for p in ignore) for part in parts]
    if any(flags) and not all(flags):
        raise ValueError(f"{prefix}: the checkpoint quantizes only some of {', '.join(parts)}, which this "
                         "engine runs as one fused layer.")
    return all(flags)
