"""The worker's LoRA manager: adapters by id, host copies in an LRU, device slots in an LRU.

``add_lora`` reads and checks an adapter (a ``ValueError`` for anything wrong with it) and keeps
at most ``max_cpu_loras`` host copies (an evicted one is read again from its path when needed).
Each step, ``set_step`` gives every adapter of the step a device slot (``max_loras`` of them,
least recently used evicted first; the scheduler never puts more adapters than slots in one
step) and writes each token's slot into the persistent index buffer the layers read.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from aphrodite.lora.layers import LoRAEmbedding, LoRALinear, LoRALogits, LoRAState
from aphrodite.lora.models import LoRAAdapter, load_adapter
from aphrodite.lora.request import LoRARequest
from aphrodite.modeling.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from aphrodite.modeling.layers.linear import LinearBase

__all__ = ["PACKED_MODULES", "LoRAManager"]

logger = logging.getLogger(__name__)

# Our fused layer -> the checkpoint (and PEFT) modules it holds, in shard order. A model may
# override it with a ``packed_modules_mapping`` attribute (vLLM's name).
PACKED_MODULES: dict[str, list[str]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                        "gate_up_proj": ["gate_proj", "up_proj"]}


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 max_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.device = device
        self.dtype = dtype
        self.state = LoRAState(max_loras, max_tokens, device)
        self.logits: LoRALogits | None = None
        self.head_ids: set[int] = set()     # adapters with LM-head weights
        self.embed_ids: set[int] = set()    # adapters with embedding weights (their steps run eagerly)
        self.layers: list[tuple[Any, list[str]]] = []     # each wrapper and its HF module names
        self.targets: dict[str, tuple[Any, int]] = {}      # HF module name -> (wrapper, projection)
        packed = getattr(model, "packed_modules_mapping", PACKED_MODULES)
        for name, module in list(model.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if isinstance(module, LinearBase):
                wrapper = LoRALinear(module, self.state, max_loras, max_lora_rank, dtype)
            elif isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
                # A tied LM head keeps pointing at the original module: the wrapper only changes the lookup.
                wrapper = LoRAEmbedding(module, self.state, max_loras, max_lora_rank, dtype)
            else:
                continue
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, wrapper)
            hf = [f"{parent_name}.{p}" if parent_name else p for p in packed.get(leaf, [leaf])]
            if len(hf) != len(wrapper.shard_ids):
                hf = [name]
            self.layers.append((wrapper, hf))
            for i, n in enumerate(hf):
                self.targets[n] = (wrapper, i)
        if isinstance(getattr(model, "lm_head", None), VocabParallelEmbedding):   # not on earlier pipeline stages
            self.logits = LoRALogits(model, max_loras, max_lora_rank, dtype, device)
            self.layers.append((self.logits, ["lm_head"]))
            self.targets["lm_head"] = (self.logits, 0)
        model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        if device.type == "cuda":   # base weights moved into storage with the A rows appended: free the old
            torch.cuda.empty_cache()
        self.registry: dict[int, LoRARequest] = {}
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.slot_of: OrderedDict[int, int] = OrderedDict()      # adapter id -> device slot, LRU first
        self.free_slots = list(range(max_loras))

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = args[0] if args else kwargs["input_ids"]
        self.state.prepare(input_ids.shape[0])

    # ---- adapters ----------------------------------------------------------------------
    def _load(self, request: LoRARequest) -> LoRAAdapter:
        adapter = load_adapter(request, self.max_lora_rank, set(self.targets), self.dtype)
        for module, (a, b) in adapter.weights.items():
            wrapper, index = self.targets[module]
            wrapper.check_shapes(module, index, a, b)
        if self.device.type == "cuda":
            adapter.pin()
        return adapter

    def _cache(self, adapter: LoRAAdapter) -> None:
        self.host[adapter.lora_int_id] = adapter
        self.host.move_to_end(adapter.lora_int_id)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def add_lora(self, request: LoRARequest) -> bool:
        """Read and check the adapter and keep it; False if this id is already there."""
        if request.lora_int_id in self.registry:
            return False
        adapter = self._load(request)
        self._cache(adapter)
        self.registry[request.lora_int_id] = request
        if "lm_head" in adapter.weights:
            self.head_ids.add(request.lora_int_id)
        if any(isinstance(self.targets[m][0], LoRAEmbedding) for m in adapter.weights):
            self.embed_ids.add(request.lora_int_id)
        logger.info("Loaded LoRA adapter %s (id %d) from %s", request.lora_name, request.lora_int_id,
                    request.lora_path)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter (host copy and device slot); False if it was not loaded."""
        self.host.pop(lora_int_id, None)
        self.head_ids.discard(lora_int_id)
        self.embed_ids.discard(lora_int_id)
        slot = self.slot_of.pop(lora_int_id, None)
        if slot is not None:
            self.free_slots.append(slot)
        return self.registry.pop(lora_int_id, None) is not None

    def list_loras(self) -> set[int]:
        return set(self.registry)

    def _adapter(self, lora_int_id: int) -> LoRAAdapter:
        adapter = self.host.get(lora_int_id)
        if adapter is None:
            request = self.registry.get(lora_int_id)
            if request is None:
                raise ValueError(f"LoRA adapter id {lora_int_id} is not loaded.")
            adapter = self._load(request)
        self._cache(adapter)
        return adapter

    def _activate(self, ids: set[int]) -> dict[int, int]:
        """A device slot for every adapter in ``ids`` (at most ``max_loras``), loading the missing ones."""
        if len(ids) > self.max_loras:
            raise RuntimeError(f"{len(ids)} adapters in one step, but max_loras is {self.max_loras}.")
        for i in ids:
            if i in self.slot_of:
                self.slot_of.move_to_end(i)
                continue
            if self.free_slots:
                slot = self.free_slots.pop()
            else:
                victim = next(v for v in self.slot_of if v not in ids)
                slot = self.slot_of.pop(victim)
            adapter = self._adapter(i)
            for wrapper, names in self.layers:
                wrapper.set_slot(slot, [adapter.weights.get(n) for n in names])
            self.slot_of[i] = slot
        return {i: self.slot_of[i] for i in ids}

    # ---- a step --------------------------------------------------------------------------
    def set_step(self, lora_ids: Sequence[int], num_tokens: Sequence[int]) -> None:
        """Activate the step's adapters and write each token's slot (requests' ``lora_ids``, 0 = none, with
        ``num_tokens`` tokens each, in batch order) into the index buffer.

        Without adapters in the step the eager forward skips the LoRA work; on the GPU the buffer is
        written anyway, since a CUDA graph (captured with LoRA on) may replay this step."""
        used = {i for i in lora_ids if i}
        slot_of = self._activate(used) if used else {}
        per_req = np.fromiter((slot_of.get(i, -1) for i in lora_ids), dtype=np.int64, count=len(lora_ids))
        slots = np.repeat(per_req, num_tokens) if len(per_req) != sum(num_tokens) else per_req
        self.state.active = bool(used)
        self.state.embed_active = bool(used & self.embed_ids)
        if used or self.device.type == "cuda":
            self.state.fill(slots)

    @property
    def needs_eager(self) -> bool:
        """The step set by ``set_step`` cannot replay a CUDA graph: the graphs leave out the embedding's
        LoRA (one launch chain fewer per step for the adapters that have none)."""
        return self.state.embed_active

    def set_logit_rows(self, lora_ids: Sequence[int]) -> None:
        """Before ``compute_logits``: the adapter of each hidden row it gets (LM-head LoRA only)."""
        if self.logits is None or not self.head_ids.intersection(lora_ids):
            return
        slots = np.fromiter((self.slot_of.get(i, -1) if i in self.head_ids else -1 for i in lora_ids),
                            dtype=np.int64, count=len(lora_ids))
        self.logits.row_slots = torch.from_numpy(slots).to(self.device, non_blocking=True)
