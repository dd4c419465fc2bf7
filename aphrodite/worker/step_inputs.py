"""Getting one step's host arrays onto the device cheaply.

On the GPU the step's tensors live in persistent device buffers (so CUDA graphs can replay
from fixed addresses) and are filled from pinned host staging buffers with non-blocking
copies. On the CPU the numpy arrays are wrapped without a copy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from aphrodite.config import EngineConfig
from aphrodite.modeling.layers.attention import AttentionMetadata

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

        def pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.zeros(shape, dtype=dtype).pin_memory(),
                    torch.zeros(shape, dtype=dtype, device=self.device))

        self.ids = pair((self.max_tokens,), torch.int64)
        self.pos = pair((self.max_tokens,), torch.int64)
        self.slots = pair((self.max_tokens,), torch.int64)
        self.seq_lens = pair((self.max_seqs,), torch.int32)
        self.starts = pair((self.max_seqs + 1,), torch.int32)
        self.tables = pair((self.max_seqs, self.max_blocks), torch.int32)
        # Decode graphs read one token per sequence: their query_start_loc never changes.
        self.decode_starts = torch.arange(self.max_seqs + 1, dtype=torch.int32, device=self.device)

    @staticmethod
    def _put(buf: tuple[torch.Tensor, torch.Tensor], values: np.ndarray, pad_to: int = 0,
             pad_value: int = 0) -> torch.Tensor:
        """Stage ``values`` (padded to ``pad_to`` rows) in pinned memory; copy to the device async."""
        host, dev = buf
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

    def to_device(self, host: HostBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, attention metadata) of an eagerly run step."""
        max_decode = max(host.seq_lens[:host.num_decodes], default=0)
        max_q = max(b - a for a, b in zip(host.starts, host.starts[1:]))
        common = dict(num_decodes=host.num_decodes, max_query_len=max_q,
                      max_seq_len=max(host.seq_lens), max_decode_seq_len=max_decode,
                      query_start_loc_cpu=host.starts, seq_lens_cpu=host.seq_lens)
        if self.device.type != "cuda":
            meta = AttentionMetadata(
                query_start_loc=torch.tensor(host.starts, dtype=torch.int32),
                seq_lens=torch.tensor(host.seq_lens, dtype=torch.int32),
                block_tables=torch.from_numpy(host.block_tables), slot_mapping=torch.from_numpy(host.slots),
                **common)
            return torch.from_numpy(host.ids), torch.from_numpy(host.positions), meta
        meta = AttentionMetadata(
            query_start_loc=self._put(self.starts, np.asarray(host.starts, dtype=np.int32)),
            seq_lens=self._put(self.seq_lens, np.asarray(host.seq_lens, dtype=np.int32)),
            block_tables=self._put(self.tables, host.block_tables),
            slot_mapping=self._put(self.slots, host.slots), **common)
        return self._put(self.ids, host.ids), self._put(self.pos, host.positions), meta

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

    def fill_decode(self, host: HostBatch, batch: int) -> None:
        """Write a decode-only step into the persistent buffers, padded to ``batch`` rows."""
        self._put(self.ids, host.ids, batch)
        self._put(self.pos, host.positions, batch)
        self._put(self.slots, host.slots, batch, pad_value=-1)
        self._put(self.seq_lens, np.asarray(host.seq_lens, dtype=np.int32), batch)
        self._put(self.tables, host.block_tables)
