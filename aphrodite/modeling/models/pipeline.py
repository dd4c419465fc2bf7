"""Pipeline parallelism on the model side, shared by every family.

A model built on pipeline stage ``p`` of ``P`` holds only its own decoder layers (a contiguous
range), the embedding only where it is used (the first stage, and the last stage when the LM
head is tied to it), and the final norm and LM head only on the last stage. The other slots
hold ``PPMissingLayer`` placeholders without parameters, so parameter names stay the
checkpoint's and ``load_weights`` skips the tensors of other stages.

A family file uses it in a few lines (see ``llama.py``)::

    self.embed_tokens = pp_module(lambda: VocabParallelEmbedding(...), first=True, last=tied)
    self.start_layer, self.end_layer, self.layers = make_layers(n, lambda prefix: Layer(config), "model.layers")
    self.norm = pp_module(lambda: RMSNorm(...), last=True)

    def forward(self, input_ids, positions, intermediate_tensors=None):
        hidden, residual = stage_input(self.embed_tokens, input_ids, intermediate_tensors)
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden, residual = layer(hidden, residual, ...)
        return stage_output(self.norm, hidden, residual)

and in ``load_weights``: ``if is_pp_missing_parameter(name, self): continue``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from aphrodite.distributed.parallel_state import get_pp_rank, get_pp_size, is_first_pp_rank, is_last_pp_rank

TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class IntermediateTensors:
    """What one stage hands the next: the hidden states ``[T, hidden]`` and the residual stream
    ``[T, hidden]`` (None for families that fold it into the hidden states)."""

    hidden_states: torch.Tensor
    residual: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The tensors to send (``pp_send_tensors``), by name."""
        out = {"hidden_states": self.hidden_states}
        if self.residual is not None:
            out["residual"] = self.residual
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> IntermediateTensors:
        return cls(tensors["hidden_states"], tensors.get("residual"))

    def __getitem__(self, rows: slice | torch.Tensor) -> IntermediateTensors:
        """The same rows of every tensor (e.g. the first ``n`` tokens of a padded graph batch)."""
        return IntermediateTensors(self.hidden_states[rows],
                                   None if self.residual is None else self.residual[rows])


def intermediate_tensor_spec(num_tokens: int, hidden_size: int, dtype: torch.dtype,
                             residual: bool = True) -> TensorSpec:
    """Shapes and dtypes of the ``IntermediateTensors`` of a ``num_tokens`` step, for ``pp_recv_tensors``."""
    spec: TensorSpec = {"hidden_states": ((num_tokens, hidden_size), dtype)}
    if residual:
        spec["residual"] = ((num_tokens, hidden_size), dtype)
    return spec


class PPMissingLayer(nn.Module):
    """Stands where another pipeline stage's module is: no parameters, and calling it is a bug."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("this module lives on another pipeline stage")


def get_pp_layer_range(num_layers: int, pp_rank: int | None = None, pp_size: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of the decoder layers stage ``pp_rank`` holds.

    Layers are split evenly; the ``num_layers % pp_size`` extra layers go one each to the
    stages just before the last (vLLM's split), since the last stage also runs the LM head.
    """
    pp_rank = get_pp_rank() if pp_rank is None else pp_rank
    pp_size = get_pp_size() if pp_size is None else pp_size
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) is larger than the number of layers ({num_layers})")
    sizes = [num_layers // pp_size] * pp_size
    for i in range(num_layers % pp_size):
        sizes[-2 - i] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def make_layers(num_layers: int, layer_fn: Callable[[str], nn.Module],
                prefix: str = "model.layers") -> tuple[int, int, nn.ModuleList]:
    """``(start, end, layers)``: a ModuleList of ``num_layers`` slots in which only this stage's
    range is built (``layer_fn(f"{prefix}.{i}")``), the others ``PPMissingLayer``."""
    start, end = get_pp_layer_range(num_layers)
    layers = nn.ModuleList(layer_fn(f"{prefix}.{i}") if start <= i < end else PPMissingLayer()
                           for i in range(num_layers))
    return start, end, layers


def pp_module(build: Callable[[], nn.Module], first: bool = False, last: bool = False) -> nn.Module:
    """``build()`` when this stage is the first (``first``) or the last (``last``) one, else a
    ``PPMissingLayer``. With one stage, always ``build()``."""
    if (first and is_first_pp_rank()) or (last and is_last_pp_rank()):
        return build()
    return PPMissingLayer()


def stage_input(embed: nn.Module, input_ids: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden, residual)`` that this stage's first layer takes: the embedding of ``input_ids`` on
    the first stage, the previous stage's tensors elsewhere."""
    if is_first_pp_rank():
        return embed(input_ids), None
    if intermediate_tensors is None:
        raise ValueError("a pipeline stage after the first needs the previous stage's intermediate_tensors")
    return intermediate_tensors.hidden_states, intermediate_tensors.residual


def stage_output(norm: nn.Module, hidden: torch.Tensor,
                 residual: torch.Tensor | None) -> torch.Tensor | IntermediateTensors:
    """The final normed hidden states on the last stage; the tensors for the next stage elsewhere.
    ``norm(hidden, residual)`` returns ``(normed, new_residual)`` (a fused add + RMSNorm)."""
    if not is_last_pp_rank():
        return IntermediateTensors(hidden, residual)
    if residual is None:
        return norm(hidden)
    return norm(hidden, residual)[0]


def pp_missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Dotted-name prefixes (``"model.layers.7."``) of the modules held by other stages."""
    return tuple(f"{name}." for name, module in model.named_modules(remove_duplicate=False)
                 if isinstance(module, PPMissingLayer))


def is_pp_missing_parameter(name: str, model: nn.Module) -> bool:
    """Whether checkpoint tensor ``name`` (in our naming) belongs to another pipeline stage."""
    prefixes = model.__dict__.get("_pp_missing_prefixes")
    if prefixes is None:   # cached: load_weights asks once per checkpoint tensor
        prefixes = model.__dict__["_pp_missing_prefixes"] = pp_missing_prefixes(model)
    return bool(prefixes) and name.startswith(prefixes)
