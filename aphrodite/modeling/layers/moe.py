"""Mixture-of-experts layers: top-k routing and the experts of one layer as stacked weights.

``FusedMoE`` holds every expert's gate/up and down projections as ``w13_weight [E, 2I, H]`` and
``w2_weight [E, H, I]`` and runs routing and experts with ``kernels.fused_moe.fused_moe`` (Triton on the
GPU: GEMV-shaped kernels with the routing inside at decode, a grouped GEMM over expert-sorted tokens
beyond; a per-expert loop on the CPU). Under tensor parallelism every rank holds all experts and
a ``1 / tp`` slice of each one's intermediate dimension (gate/up rows, down columns), so the partial
outputs are all-reduced like a row-parallel layer's.

``SparseMoeBlock`` is the feed-forward block of the MoE families: router (``gate``), experts, and
optionally a shared expert with its sigmoid gate (Qwen2-MoE). Checkpoints name experts one by one
(``experts.{e}.gate_proj``/``w1`` ...) or, as transformers 5 holds them in memory, stacked
(``experts.gate_up_proj``/``experts.down_proj``); ``expert_params_mapping`` maps either.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from aphrodite.distributed.communication import tensor_model_parallel_all_reduce
from aphrodite.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from aphrodite.kernels.fused_moe import SCORING_FUNCTIONS, fused_moe
from aphrodite.modeling.layers.linear import ReplicatedLinear, copy_into, new_parameter
from aphrodite.modeling.layers.mlp import GatedMLP
from aphrodite.modeling.layers.quantization import QuantizationConfig


class FusedMoE(nn.Module):
    """The routed experts of one layer. ``forward(x, router_logits) -> [T, H]``."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool = True, scoring_func: str = "softmax", activation: str = "silu",
                 reduce_results: bool = True, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        if quant_config is not None and quant_config.get_linear_method(self, prefix) is not None:
            raise ValueError(f"Quantized MoE experts are not supported yet ({prefix}); the attention and "
                             "dense layers of this checkpoint could be, its experts cannot.")
        if scoring_func not in SCORING_FUNCTIONS:
            raise ValueError(f"MoE scoring function {scoring_func!r} is not supported; supported: "
                             f"{SCORING_FUNCTIONS}")
        self.tp_rank = get_tensor_model_parallel_rank()
        self.tp_size = get_tensor_model_parallel_world_size()
        if intermediate_size % self.tp_size:
            raise ValueError(f"MoE intermediate size ({intermediate_size}) is not divisible by the "
                             f"tensor-parallel size ({self.tp_size})")
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size // self.tp_size   # per rank
        self.renormalize, self.scoring_func, self.activation = renormalize, scoring_func, activation
        self.reduce_results = reduce_results
        i = self.intermediate_size
        self.w13_weight = new_parameter((num_experts, 2 * i, hidden_size), self.weight_loader)
        self.w2_weight = new_parameter((num_experts, hidden_size, i), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        """``shard_id = (expert or None, "w1" | "w3" | "w13" | "w2")``; ``None`` = all experts stacked.

        ``w1``/``w3`` are one expert's gate/up ``[I, H]``, ``w13`` both stacked ``[2I, H]``, ``w2`` its
        down ``[H, I]``; this rank keeps its slice of ``I``."""
        expert, kind = shard_id if isinstance(shard_id, tuple) else (None, shard_id)
        if expert is None:   # [E, ...] for every expert at once; each expert's block read on its own
            for e in range(self.num_experts):
                self.weight_loader(param, loaded_weight.narrow(0, e, 1), (e, kind))
            return
        lead = loaded_weight.dim() - 2   # 1 for an expert's [1, N, K] block of a stacked tensor
        i, r = self.intermediate_size, self.tp_rank
        dst = param.data[expert]

        def put(part: torch.Tensor, dim: int, start: int) -> None:
            src = loaded_weight.narrow(lead + dim, start, i)
            copy_into(part, src.reshape(part.shape))   # a lazy checkpoint block is read here
        if kind == "w2":
            put(dst, 1, r * i)
        elif kind == "w13":
            put(dst[:i], 0, r * i)
            put(dst[i:], 0, loaded_weight.shape[lead] // 2 + r * i)
        elif kind in ("w1", "w3"):
            put(dst[:i] if kind == "w1" else dst[i:], 0, r * i)
        else:
            raise ValueError(f"unknown expert shard {kind!r}")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        out = fused_moe(x, router_logits, self.w13_weight, self.w2_weight, self.top_k, self.renormalize,
                        self.scoring_func, self.activation)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate_per_rank={self.intermediate_size}, renormalize={self.renormalize}, "
                f"scoring={self.scoring_func}, tp_size={self.tp_size}")


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ a shared expert scaled by ``sigmoid(shared_expert_gate(x))``)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, moe_intermediate_size: int,
                 renormalize: bool, hidden_act: str = "silu", scoring_func: str = "softmax",
                 shared_expert_intermediate_size: int = 0, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, quant_config=None,
                                     prefix=f"{prefix}.gate")
        self.experts = FusedMoE(num_experts, top_k, hidden_size, moe_intermediate_size, renormalize, scoring_func,
                                "silu" if hidden_act in ("silu", "swish") else "gelu", reduce_results=False,
                                quant_config=quant_config, prefix=f"{prefix}.experts")
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size, hidden_act,
                                          quant_config=quant_config, prefix=f"{prefix}.shared_expert",
                                          reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, bias=False, quant_config=None,
                                                       prefix=f"{prefix}.shared_expert_gate")
            # GGUF files store this [1, H] weight as a vector.
            self.shared_expert_gate.weight.weight_loader = _vector_or_row_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.experts.tp_size > 1:   # one all-reduce for the routed and the shared partial sums
            out = tensor_model_parallel_all_reduce(out)
        return out


def _vector_or_row_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    copy_into(param.data, loaded_weight.reshape(param.shape))


_EXPERT_RE = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$")
_STACKED_RE = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj|gate_proj|up_proj)(?:\.weight)?$")


def expert_params_mapping(gate: str = "gate_proj", up: str = "up_proj",
                          down: str = "down_proj") -> Any:
    """A function ``name -> (parameter name, shard id) | None`` for checkpoint expert tensors named
    ``...experts.{e}.{gate|up|down}.weight`` (per expert) or ``...experts.gate_up_proj``/``down_proj``
    (stacked, as transformers 5 holds them), or ``...experts.{gate|up|down}_proj.weight`` (stacked per
    projection, as the GGUF loader names them)."""
    kinds = {gate: "w1", up: "w3", down: "w2"}

    def parse(name: str) -> tuple[str, object] | None:
        if m := _EXPERT_RE.fullmatch(name):
            base, expert, proj = m.groups()
            kind = kinds.get(proj)
            if kind is None:
                return None
            return f"{base}.{'w2' if kind == 'w2' else 'w13'}_weight", (int(expert), kind)
        if m := _STACKED_RE.fullmatch(name):   # [E, ...]: transformers 5 in memory, GGUF per projection
            base, proj = m.groups()
            kind = {"gate_up_proj": "w13", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
            return f"{base}.{'w2' if kind == 'w2' else 'w13'}_weight", (None, kind)
        return None

    return parse
