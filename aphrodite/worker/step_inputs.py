"""Getting one step's host arrays onto the device cheaply.

On the GPU the step's tensors live in persistent device buffers (so CUDA graphs can replay
from fixed addresses) and are filled from pinned host staging buffers with non-blocking
copies. On the CPU the numpy arrays are wrapped without a copy.

The pinned staging buffers come in two sets used by alternate steps: with async scheduling
the host fills step N+1's while step N's copies may not have run yet. A set is reused only
after the event recorded behind its copies (two steps ago) has passed.

Decode input ids that the previous step sampled (still only on the device) are gathered
from its sampled-ids tensor by index, after the host's ids are copied in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from aphrodite.config import EngineConfig
from aphrodite.kernels.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from aphrodite.worker.model_runner import HostBatch


class StepInputs:
    def __init__(self, config: EngineConfig) -> None:
        self.device = config.device
        sc = config.scheduler
        self.max_tokens = max(sc.max_num_batched_tokens, sc.max_num_seqs)
        self.max_seqs = sc.max_num_seqs
        self.max_blocks = -(-sc.max_model_len // config.cache.block_size)
        self.max_model_len = sc.max_model_len
        if self.device.type != "cuda":
            return

        shapes = {"ids": ((self.max_tokens,), torch.int64), "pos": ((self.max_tokens,), torch.int64),
                  "slots": ((self.max_tokens,), torch.int64), "seq_lens": ((self.max_seqs,), torch.int32),
                  "starts": ((self.max_seqs + 1,), torch.int32),
                  "tables": ((self.max_seqs, self.max_blocks), torch.int32),
                  "gather_dst": ((self.max_seqs,), torch.int64), "gather_src": ((self.max_seqs,), torch.int64)}
        self._staging = [{k: torch.zeros(shape, dtype=dt).pin_memory() for k, (shape, dt) in shapes.items()}
                         for _ in range(2)]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._set = 0
        # (pinned staging of set 0, persistent device buffer) per input; the graphs use [1].
        for k, (shape, dt) in shapes.items():
            setattr(self, k, (self._staging[0][k], torch.zeros(shape, dtype=dt, device=self.device)))
        # Decode graphs read one token per sequence: their query_start_loc never changes.
        self.decode_starts = torch.arange(self.max_seqs + 1, dtype=torch.int32, device=self.device)

    def begin_step(self) -> None:
        """Switch to the other staging set, first waiting until its last copies have run."""
        if self.device.type != "cuda":
            return
        self._set ^= 1
        event = self._events[self._set]
        if event is not None:
            event.synchronize()

    def end_step(self) -> None:
        """Mark the point after which this step's staging set may be refilled."""
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record()
        self._events[self._set] = event

    def _put(self, name: str, values: np.ndarray, pad_to: int = 0, pad_value: int = 0) -> torch.Tensor:
        """Stage ``values`` (padded to ``pad_to`` rows) in pinned memory; copy to the device async."""
        dev = getattr(self, name)[1]
        host = self._staging[self._set][name]
        n = len(values)
        rows = max(n, pad_to)
        if values.ndim == 1:
            h = host[:rows].numpy()
            h[:n] = values
            h[n:rows] = pad_value
            dev[:rows].copy_(host[:rows], non_blocking=True)
            return dev[:rows]
        width = values.shape[1]
        h = host[:n, :width].numpy()
        h[:] = values
        dev[:n, :width].copy_(host[:n, :width], non_blocking=True)
        return dev[:rows]

    def _gather_prev(self, host: HostBatch, ids: torch.Tensor) -> None:
        """Write the input ids that the previous step sampled (on the device) into ``ids``."""
        prev = host.from_prev
        if prev is None:
            return
        if self.device.type != "cuda":
            ids[torch.from_numpy(prev.dst)] = prev.tokens[torch.from_numpy(prev.src)]
            return
        dst = self._put("gather_dst", prev.dst)
        src = self._put("gather_src", prev.src)
        ids.index_copy_(0, dst, prev.tokens.index_select(0, src))

    def to_device(self, host: HostBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, attention metadata) of an eagerly run step."""
        starts, seq_lens = _int32(host.starts_np, host.starts), _int32(host.seq_lens_np, host.seq_lens)
        max_decode = int(seq_lens[:host.num_decodes].max()) if host.num_decodes else 0
        max_q = host.max_query_len or int(np.diff(starts).max())
        common = dict(num_decodes=host.num_decodes, max_query_len=max_q,
                      max_seq_len=int(seq_lens.max()), max_decode_seq_len=max_decode,
                      query_start_loc_cpu=host.starts, seq_lens_cpu=host.seq_lens)
        if self.device.type != "cuda":
            meta = AttentionMetadata(
                query_start_loc=torch.from_numpy(starts), seq_lens=torch.from_numpy(seq_lens),
                block_tables=torch.from_numpy(host.block_tables), slot_mapping=torch.from_numpy(host.slots),
                **common)
            ids = torch.from_numpy(host.ids)
            self._gather_prev(host, ids)
            return ids, torch.from_numpy(host.positions), meta
        meta = AttentionMetadata(
            query_start_loc=self._put("starts", starts),
            seq_lens=self._put("seq_lens", seq_lens),
            block_tables=self._put("tables", host.block_tables),
            slot_mapping=self._put("slots", host.slots), **common)
        ids = self._put("ids", host.ids)
        self._gather_prev(host, ids)
        return ids, self._put("pos", host.positions), meta

    def decode_metadata(self, batch: int) -> AttentionMetadata:
        """Metadata over the first ``batch`` rows of the persistent buffers (what a graph captures).

        Lengths are the worst case so the kernels' launch choices (split-KV) fit any replay.
        """
        return AttentionMetadata(
            num_decodes=batch, query_start_loc=self.decode_starts[:batch + 1],
            seq_lens=self.seq_lens[1][:batch], block_tables=self.tables[1][:batch],
            slot_mapping=self.slots[1][:batch], max_query_len=1, max_seq_len=self.max_model_len,
            max_decode_seq_len=self.max_model_len, query_start_loc_cpu=list(range(batch + 1)),
            seq_lens_cpu=[self.max_model_len] * batch)

    def prefill_metadata(self, tokens: int) -> AttentionMetadata:
        """Metadata of one sequence's prefill chunk of up to ``tokens`` tokens over the persistent buffers
        (what a prefill graph captures). The kernels size their grids for ``tokens`` query tokens and
        read the true query and context lengths from the buffers at replay; padded tokens have slot -1."""
        return AttentionMetadata(
            num_decodes=0, query_start_loc=self.starts[1][:2], seq_lens=self.seq_lens[1][:1],
            block_tables=self.tables[1][:1], slot_mapping=self.slots[1][:tokens], max_query_len=tokens,
            max_seq_len=self.max_model_len, max_decode_seq_len=0, query_start_loc_cpu=[0, tokens],
            seq_lens_cpu=[self.max_model_len])

    def fill_prefill(self, host: HostBatch, tokens: int) -> None:
        """Write a one-sequence prefill step into the persistent buffers, padded to ``tokens`` tokens."""
        self._put("ids", host.ids, tokens)
        self._put("pos", host.positions, tokens)
        self._put("slots", host.slots, tokens, pad_value=-1)
        self._put("starts", _int32(host.starts_np, host.starts))
        self._put("seq_lens", _int32(host.seq_lens_np, host.seq_lens))
        self._put("tables", host.block_tables)

    def fill_decode(self, host: HostBatch, batch: int) -> None:
        """Write a decode-only step into the persistent buffers, padded to ``batch`` rows."""
        self._gather_prev(host, self._put("ids", host.ids, batch))
        self._put("pos", host.positions, batch)
        self._put("slots", host.slots, batch, pad_value=-1)
        self._put("seq_lens", _int32(host.seq_lens_np, host.seq_lens), batch)
        self._put("tables", host.block_tables)


def _int32(array: np.ndarray | None, values: list[int]) -> np.ndarray:
    """``array`` when the batch built it already, else ``values`` as an int32 array."""
    return array if array is not None else np.asarray(values, dtype=np.int32)


def slice_metadata(meta: AttentionMetadata, first: int, last: int) -> AttentionMetadata:
    """The layout of sequences ``first..last-1`` of ``meta``'s batch on their own (their tokens are the
    contiguous run ``query_start_loc[first]..query_start_loc[last]``), as views of its device tensors."""
    q0, q1 = meta.query_start_loc_cpu[first], meta.query_start_loc_cpu[last]
    starts = meta.query_start_loc[first:last + 1]
    starts_cpu = [q - q0 for q in meta.query_start_loc_cpu[first:last + 1]]
    seq_lens_cpu = meta.seq_lens_cpu[first:last]
    num_decodes = max(0, min(meta.num_decodes, last) - first)
    return AttentionMetadata(
        num_decodes=num_decodes, query_start_loc=starts - q0 if q0 else starts,
        seq_lens=meta.seq_lens[first:last], block_tables=meta.block_tables[first:last],
        slot_mapping=meta.slot_mapping[q0:q1], max_query_len=max(b - a for a, b in zip(starts_cpu, starts_cpu[1:])),
        max_seq_len=max(seq_lens_cpu), max_decode_seq_len=max(seq_lens_cpu[:num_decodes], default=0),
        query_start_loc_cpu=starts_cpu, seq_lens_cpu=seq_lens_cpu)


class BitmaskUpload:
    """The grammar bitmask's way to the device: a persistent device buffer filled from two alternating pinned
    staging buffers, like the step inputs (a 128k vocabulary's mask is 4 MiB per 256 rows: pinning a fresh
    copy every step cost the host more than the sampler launch). A mask that already lies in pinned memory
    (the engine's own buffer, in process) is copied from where it is."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host: list[torch.Tensor | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._dev: torch.Tensor | None = None
        self._set = 0

    def __call__(self, bitmask: np.ndarray) -> torch.Tensor:
        """``bitmask`` ([rows, words] int32) on the device; valid until the next call's copy (stream order)."""
        src = torch.from_numpy(np.require(bitmask, np.int32, ["C", "W"]))
        if self.device.type != "cuda":
            return src
        rows, words = src.shape
        if self._dev is None or self._dev.shape[0] < rows or self._dev.shape[1] != words:
            cap = max(rows, 2 * (0 if self._dev is None or self._dev.shape[1] != words else self._dev.shape[0]))
            for e in self._events:
                if e is not None:
                    e.synchronize()
            self._dev = torch.empty((cap, words), dtype=torch.int32, device=self.device)
            self._host = [torch.empty((cap, words), dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._events = [None, None]
        self._set ^= 1
        event = self._events[self._set]
        if src.is_pinned():
            host = src
        else:
            if event is not None:
                event.synchronize()     # its copy of two masks ago has run (long since, in practice)
            host = self._host[self._set][:rows]
            host.copy_(src)
        dev = self._dev[:rows]
        dev.copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[self._set] = event
        return dev
