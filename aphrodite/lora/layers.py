"""Linear layers with LoRA: the wrapped layer's own forward (any ``quant_method``) plus each token's delta.

Every adaptable layer gets stacked weights with one slot per device adapter:
``lora_a [S, n*R, in]`` and ``lora_b [S, out, n*R]`` (``n`` fused projections, e.g. q/k/v, each
with its own rank-``R`` block: ``lora_b`` is block-diagonal across them, so one shrink and one
expand cover a fused layer). A token's delta is ``(x @ A[slot]^T) @ B[slot]^T``; tokens of the
base model have slot ``-1``. The slot of every token sits in one persistent buffer
(``LoRAState.slots``) that the runner fills each step, so CUDA graphs replay with new slots.

Tensor parallelism follows vLLM: column layers keep A whole and shard B's rows like the base
weight; row layers shard A's columns like the base weight and keep B whole, and the delta is
added to the partial output before the all-reduce. The shards are cut by the base layer's own
``weight_loader``, so LoRA and base weights always split the same way.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.distributed.communication import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from aphrodite.distributed.parallel_state import get_pp_size
from aphrodite.kernels.lora import (
    SPLIT_K_MAX_TOKENS,
    TILE_M,
    TILE_MAX_TOKENS,
    LoRAMetadata,
    lora_expand,
    lora_expand_tiles,
    lora_expand_tokens,
    lora_shrink,
    lora_shrink_tiles,
    lora_tiles_host,
    lora_token_metadata,
    lora_token_metadata_host,
    num_tiles_bound,
    partials_buffer,
)
from aphrodite.kernels.triton_utils import use_triton
from aphrodite.modeling.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

__all__ = ["LoRAEmbedding", "LoRALinear", "LoRALogits", "LoRAState"]


def _require_shapes(module: str, a: torch.Tensor, b: torch.Tensor, a_cols: int, b_rows: int) -> None:
    """ValueError unless an adapter's ``A [r, a_cols]`` and ``B [b_rows, r]`` fit the layer."""
    if a.shape[1] != a_cols or b.shape[0] != b_rows:
        raise ValueError(f"LoRA weights of {module} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; the model "
                         f"needs A [r, {a_cols}], B [{b_rows}, r]: the adapter is for another model.")

class LoRAState:
    """What every LoRA layer of one model reads in a forward pass: each token's slot, grouped by slot.

    One persistent int64 buffer holds ``[counts (S+1) | starts (S+1) | tiles (max_tiles x (2 + TILE_M)) |
    slots (max_tokens) | order (max_tokens)]``: the runner fills it from the host before each step
    (``fill``), the layers read views of it, so a CUDA graph replays with the new step's values and
    nothing is sorted on the device. Steps of at most ``TILE_MAX_TOKENS`` tokens run the tile kernels
    (``lora_tiles_host``'s rows); bigger ones the per-slot ``counts``/``starts``.
    """

    def __init__(self, num_slots: int, max_tokens: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.max_tokens = max_tokens
        self.max_tiles = num_tiles_bound(min(TILE_MAX_TOKENS, max_tokens), num_slots)
        s1 = num_slots + 1
        self._tiles_at = 2 * s1
        self._slots_at = self._tiles_at + (2 + TILE_M) * self.max_tiles
        self.buffer = torch.zeros(self._slots_at + 2 * max_tokens, dtype=torch.int64, device=device)
        self.counts = self.buffer[:s1]
        self.starts = self.buffer[s1:2 * s1]
        self.tiles = self.buffer[self._tiles_at:self._slots_at].view(self.max_tiles, 2 + TILE_M)
        self.slots = self.buffer[self._slots_at:self._slots_at + max_tokens]
        self.order = self.buffer[self._slots_at + max_tokens:]
        self.slots.fill_(-1)
        self.counts[0] = max_tokens
        self.order.copy_(torch.arange(max_tokens))
        # False: no token of this step uses an adapter, the layers skip the LoRA work (eagerly, or by
        # replaying a graph captured without LoRA; larger graphs hold LoRA and skip slot -1 tokens).
        self.active = False
        # True: an adapter of this step has embedding LoRA weights. CUDA graphs are captured without
        # the embedding's LoRA, so the runner runs such a step eagerly (``needs_eager``).
        self.embed_active = False
        self.meta: LoRAMetadata | None = None
        self.step_tiles: torch.Tensor | None = None     # this step's rows of ``tiles`` (small steps)
        self.num_layers = 0         # LoRA layers registered; each owns a row of ``scratch``
        self.max_width = 0          # widest stacked rank (fused projections x max rank)
        self.scratch: torch.Tensor | None = None
        self._partials: torch.Tensor | None = None
        # Small steps shrink on this stream beside the base GEMM (fork/join edges inside CUDA graphs).
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staging: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._set = 0
        self._last: np.ndarray | None = None      # the slots of the last fill (GPU)
        if device.type == "cuda":   # two pinned sets: the host fills one while the other's copy may be queued
            self._staging = [torch.empty_like(self.buffer, device="cpu").pin_memory() for _ in range(2)]

    def register(self, width: int) -> int:
        """A new layer's index into ``scratch``."""
        self.num_layers += 1
        self.max_width = max(self.max_width, width)
        return self.num_layers - 1

    def partials(self) -> torch.Tensor:
        """The partial-shrink buffer of small steps (``lora_shrink_tiles``), made once every layer is known;
        layers take turns with it (a layer's shrink is queued after the previous layer's expand)."""
        if self._partials is None:
            self._partials = partials_buffer(self.max_tiles, self.max_width, self.buffer.device)
        return self._partials

    def fill(self, slots: np.ndarray) -> None:
        """Write one step's token slots (and, for the Triton kernels, their grouping by slot and tiles)."""
        n = len(slots)
        if not use_triton(self.buffer):
            self.slots[:n] = torch.from_numpy(slots)
            return
        on_gpu = self.buffer.device.type == "cuda"
        if on_gpu and self._last is not None and np.array_equal(self._last, slots):
            return      # decode steps of the same requests: the device already holds these values
        self._last = slots.copy() if on_gpu else None
        s1 = self.num_slots + 1
        order, counts, starts = lora_token_metadata_host(slots, self.num_slots)
        tiles = lora_tiles_host(slots, self.num_slots, self.max_tiles) if n <= TILE_MAX_TOKENS else None
        if not on_gpu:   # the Triton interpreter on the CPU
            for dst, src in ((self.counts, counts), (self.starts, starts), (self.slots, slots), (self.order, order)):
                dst[:len(src)] = torch.from_numpy(src)
            if tiles is not None:
                self.tiles.copy_(torch.from_numpy(tiles))
            return
        self._set ^= 1
        event = self._events[self._set]
        if event is not None:
            event.synchronize()
        staging = self._staging[self._set]
        host = staging.numpy()
        host[:s1], host[s1:2 * s1] = counts, starts
        if tiles is not None:
            host[self._tiles_at:self._slots_at] = tiles.reshape(-1)
        head = self._slots_at + n
        host[self._slots_at:head] = slots
        base = self._slots_at + self.max_tokens
        host[base:base + n] = order
        self.buffer[:head].copy_(staging[:head], non_blocking=True)
        self.buffer[base:base + n].copy_(staging[base:base + n], non_blocking=True)
        self._events[self._set] = torch.cuda.Event()
        self._events[self._set].record()

    def prepare(self, num_tokens: int) -> None:
        """The forward pass's views of the buffer (a model forward pre-hook calls this): the tile rows of a
        small step, else the grouping plus one zeroed shrink output for every layer when the shrink
        accumulates split-K partial sums."""
        self.scratch = None
        self.step_tiles = None
        if not self.active:
            self.meta = None
            return
        self.meta = (self.slots[:num_tokens], self.order[:num_tokens], self.counts, self.starts)
        if not use_triton(self.buffer):
            return
        if num_tokens <= TILE_MAX_TOKENS:
            self.step_tiles = self.tiles[:num_tiles_bound(num_tokens, self.num_slots)]
            self.partials()
        elif num_tokens <= SPLIT_K_MAX_TOKENS:
            self.scratch = torch.zeros(self.num_layers, num_tokens, self.max_width, dtype=torch.float32,
                                       device=self.buffer.device)


def _slices(layer: LinearBase) -> list[object]:
    """The shard ids of the fused projections of ``layer`` (what its ``weight_loader`` takes)."""
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def _slice_sizes(layer: LinearBase) -> list[int]:
    """This rank's output columns of each fused projection of ``layer``, in order."""
    if isinstance(layer, QKVParallelLinear):
        return [layer.q_size, layer.kv_size, layer.kv_size]
    if isinstance(layer, MergedColumnParallelLinear):
        return [size // layer.tp_size for size in layer.output_sizes]
    return [layer.out_features]


class LoRALinear(nn.Module):
    """``base_layer``'s output plus the LoRA delta of each token's adapter slot."""

    def __init__(self, base_layer: LinearBase, state: LoRAState, max_loras: int, max_rank: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.shard_ids = _slices(base_layer)
        self.slice_sizes = _slice_sizes(base_layer)
        self.max_rank = max_rank
        self.is_row = isinstance(base_layer, RowParallelLinear)
        self.is_column = isinstance(base_layer, ColumnParallelLinear)
        nr = len(self.shard_ids) * max_rank
        self.index = state.register(nr)
        device = state.slots.device
        # Small steps on a plain weight: every slot's A rows sit below the base weight in one matrix, so
        # the base GEMM also gives each token's shrink for every slot (no shrink kernel on the way).
        self.weight_cat: torch.Tensor | None = None
        self.bias_cat: torch.Tensor | None = None
        if self._can_append_a(dtype):
            self.lora_a = self._append_a(max_loras, nr)
        else:
            self.lora_a = torch.zeros(max_loras, nr, base_layer.in_features, dtype=dtype, device=device)
        if device.type == "cuda":
            self.lora_b = torch.zeros(max_loras, base_layer.out_features, nr, dtype=dtype, device=device)
        else:  # [out, S, R] storage: the reference multiplies by every slot with one matmul, no copy
            self.lora_b = torch.zeros(base_layer.out_features, max_loras, nr, dtype=dtype).permute(1, 0, 2)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)   # q_size, num_heads, ... of the wrapped layer

    def _can_append_a(self, dtype: torch.dtype) -> bool:
        """A plain weight in the LoRA dtype on the Triton path, and an output nobody needs contiguous (the
        layer then returns a row-strided view): not an all-reduced/all-gathered shard, nor the last
        layer of a pipeline stage whose hidden states are sent on."""
        base = self.base_layer
        weight = getattr(base, "weight", None)
        return (isinstance(base.quant_method, UnquantizedLinearMethod) and isinstance(weight, torch.Tensor)
                and weight.dtype == dtype and use_triton(weight) and len(self.slice_sizes) <= 3
                and base.tp_size == 1 and get_pp_size() == 1)

    def _append_a(self, max_loras: int, width: int) -> torch.Tensor:
        """Move the base weight (and bias) into ``[out + S * width, in]`` storage, the base parameter
        becoming a view of its first rows; returns the rest as the stacked ``lora_a [S, width, in]``."""
        base = self.base_layer
        w = base.weight
        n, k = w.shape
        cat = torch.zeros(n + max_loras * width, k, dtype=w.dtype, device=w.device)
        cat[:n].copy_(w.data)
        w.data = cat[:n]
        self.weight_cat = cat
        if base.bias is not None:
            bias = torch.zeros(cat.shape[0], dtype=base.bias.dtype, device=base.bias.device)
            bias[:n].copy_(base.bias.data)
            base.bias.data = bias[:n]
            self.bias_cat = bias
        return cat[n:].view(max_loras, width, k)

    # ---- slots ----------------------------------------------------------------------
    def _shard(self, full: torch.Tensor, dim: int, shape: tuple[int, int], shard_id: object) -> torch.Tensor:
        """This rank's part of ``full`` cut by the base layer's loader (sharding ``dim`` as its weight)."""
        part = torch.zeros(shape, dtype=full.dtype)
        if dim == 0:
            part.output_dim = 0
        else:
            part.input_dim = 1
        self.base_layer.weight_loader(part, full, shard_id)
        return part

    def set_slot(self, slot: int, weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Put one adapter's (A [r, in], scaled B [out, r]) per fused projection into ``slot`` (None: zeros)."""
        a_slot, b_slot = self.lora_a[slot], self.lora_b[slot]
        a_slot.zero_()
        b_slot.zero_()
        base = self.base_layer
        for i, (sid, ab) in enumerate(zip(self.shard_ids, weights)):
            if ab is None:
                continue
            a, b = ab
            r = a.shape[0]
            cols = slice(i * self.max_rank, i * self.max_rank + r)
            if self.is_row and base.tp_size > 1:
                a = self._shard(a, 1, (r, base.in_features), sid)
            elif self.is_column and base.tp_size > 1:
                b = self._shard(b, 0, (base.out_features, r), sid)
            elif len(self.shard_ids) > 1:       # one rank: place the projection's rows in the fused output
                b = self._shard(b, 0, (base.out_features, r), sid)
            a_slot[cols].copy_(a, non_blocking=True)
            b_slot[:, cols].copy_(b, non_blocking=True)

    def check_shapes(self, module: str, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """ValueError when an adapter's A/B do not fit this layer's projection ``index`` (unsharded)."""
        base = self.base_layer
        in_total = base.in_features * (base.tp_size if self.is_row else 1)
        if isinstance(base, QKVParallelLinear):
            heads = base.total_num_heads if index == 0 else base.total_num_kv_heads
            out_total = heads * base.head_size
        elif isinstance(base, MergedColumnParallelLinear):
            out_total = base.output_sizes[index]
        else:
            out_total = base.out_features * (base.tp_size if self.is_column else 1)
        _require_shapes(module, a, b, in_total, out_total)

    # ---- forward ----------------------------------------------------------------------
    def _start_shrink(self, x: torch.Tensor) -> torch.Tensor | None:
        """Small steps without appended A rows: the K-split partial shrink, queued on the side stream (CUDA)
        so that it can run beside the base GEMM and only the expand follows the GEMM."""
        state = self.state
        tiles = state.step_tiles
        if tiles is None or self.weight_cat is not None or len(self.slice_sizes) > 3:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        side = state.side_stream
        if side is None:
            return lora_shrink_tiles(x2, self.lora_a, tiles, state.partials())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            return lora_shrink_tiles(x2, self.lora_a, tiles, state.partials())

    def _appended_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Small step, A rows appended: one GEMM gives the base output and every slot's shrink, one expand
        adds each tile's delta into the (row-strided) base columns."""
        n = self.base_layer.out_features
        x2 = x.reshape(-1, x.shape[-1])
        wide = F.linear(x2, self.weight_cat, self.bias_cat)
        y = wide[:, :n]
        lora_expand_tokens(wide[:, n:], self.lora_b, self.state.step_tiles, y, self.slice_sizes, self.max_rank)
        return y.view(*x.shape[:-1], n)

    def _add_delta(self, x: torch.Tensor, out: torch.Tensor, part: torch.Tensor | None) -> torch.Tensor:
        meta = self.state.meta
        if meta is None:
            return out
        if not out.is_contiguous():   # the expand adds in place
            out = out.contiguous()
        y2 = out.view(-1, out.shape[-1])
        if part is not None:
            if self.state.side_stream is not None:
                torch.cuda.current_stream().wait_stream(self.state.side_stream)
            lora_expand_tiles(part, self.lora_b, self.state.step_tiles, y2, self.slice_sizes, self.max_rank)
            return out
        scratch = self.state.scratch
        buf = None if scratch is None else scratch[self.index, :, :self.lora_a.shape[1]]
        lora_expand(lora_shrink(x.reshape(-1, x.shape[-1]), self.lora_a, meta, buf), self.lora_b, meta, y2)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.weight_cat is not None and self.state.step_tiles is not None:
            return self._appended_forward(x)
        part = self._start_shrink(x)
        if self.is_row and base.tp_size > 1:
            out = self._add_delta(x, base.quant_method.apply(base, x), part)
            if base.reduce_results:
                out = tensor_model_parallel_all_reduce(out)
            return out if base.bias is None else out + base.bias
        out = self._add_delta(x, base.quant_method.apply(base, x, base.bias), part)
        if getattr(base, "gather_output", False) and base.tp_size > 1:
            out = tensor_model_parallel_all_gather(out, dim=-1)
        return out


def _stacked_b(max_loras: int, rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[S, rows, width]`` B weights; on the CPU stored ``[rows, S, width]`` (see ``LoRALinear``)."""
    if device.type == "cuda":
        return torch.zeros(max_loras, rows, width, dtype=dtype, device=device)
    return torch.zeros(rows, max_loras, width, dtype=dtype).permute(1, 0, 2)


class LoRAEmbedding(nn.Module):
    """The token embedding plus ``B[slot] @ A[slot][:, token]`` (PEFT's ``lora_embedding_A/B``).

    A and B are kept whole on every rank (the base embedding's output is already all-reduced), A
    transposed so a token's rank vector is one row: ``lora_a [S, vocab, R]``."""

    def __init__(self, base_layer: nn.Module, state: LoRAState, max_loras: int, max_rank: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.shard_ids = [None]
        device = state.buffer.device
        self.lora_a = torch.zeros(max_loras, base_layer.num_embeddings, max_rank, dtype=dtype, device=device)
        self.lora_b = _stacked_b(max_loras, base_layer.embedding_dim, max_rank, dtype, device)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def check_shapes(self, module: str, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        _require_shapes(module, a, b, self.base_layer.num_embeddings, self.base_layer.embedding_dim)

    def set_slot(self, slot: int, weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if weights[0] is not None:
            a, b = weights[0]
            r = a.shape[0]
            self.lora_a[slot, :, :r].copy_(a.t(), non_blocking=True)
            self.lora_b[slot][:, :r].copy_(b, non_blocking=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(input_ids)
        meta = self.state.meta
        if meta is None or not self.state.embed_active:
            return out
        out = out.contiguous()
        buf = self.lora_a[meta[0].clamp(min=0), input_ids].float()   # rows of slot -1 are never added
        lora_expand(buf, self.lora_b, meta, out.view(-1, out.shape[-1]))
        return out


class LoRALogits:
    """LoRA on the LM head: ``model.compute_logits`` then adds each row's ``(h @ A^T) @ B^T``.

    The rows of a ``compute_logits`` call are the runner's choice (sampled rows, prompt-logprob
    slices), so the runner says each row's slot first (``row_slots``). A and B are whole on every rank
    and the delta is added to the gathered logits."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        head = model.lm_head
        self.vocab, hidden = head.num_embeddings, head.embedding_dim
        self.shard_ids = [None]
        self.num_slots = max_loras
        self.lora_a = torch.zeros(max_loras, max_rank, hidden, dtype=dtype, device=device)
        self.lora_b = _stacked_b(max_loras, self.vocab, max_rank, dtype, device)
        self.row_slots: torch.Tensor | None = None     # set by the runner before each call; None: no LoRA
        self._compute = model.compute_logits
        model.compute_logits = self.compute_logits

    def check_shapes(self, module: str, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        _require_shapes(module, a, b, self.lora_a.shape[2], self.vocab)

    def set_slot(self, slot: int, weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if weights[0] is not None:
            a, b = weights[0]
            r = a.shape[0]
            self.lora_a[slot, :r].copy_(a, non_blocking=True)
            self.lora_b[slot][:, :r].copy_(b, non_blocking=True)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._compute(hidden)
        rows, self.row_slots = self.row_slots, None
        if rows is None:
            return logits
        meta = (lora_token_metadata(rows, self.num_slots) if use_triton(logits)
                else (rows, rows, rows, rows))
        lora_expand(lora_shrink(hidden.contiguous(), self.lora_a, meta), self.lora_b, meta, logits)
        return logits
