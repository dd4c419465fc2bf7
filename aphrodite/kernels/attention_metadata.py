"""The per-step layout of a flat token batch that the attention kernels read.

It lives here, below the modeling layers, because kernels import nothing above them; the
modeling package re-exports it (``aphrodite.modeling.layers.attention.AttentionMetadata``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_decodes: int            # the first num_decodes sequences have exactly one query token
    query_start_loc: torch.Tensor  # int32 [B + 1], device
    seq_lens: torch.Tensor         # int32 [B], context length including this step's tokens, device
    block_tables: torch.Tensor     # int32 [B, max_blocks], device
    slot_mapping: torch.Tensor     # int64 [T], device; -1 = do not write (padding)
    max_query_len: int
    max_seq_len: int
    max_decode_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
