"""A large tensor-parallel step runs as two halves of its sequences (``ModelRunner._forward_overlapped``):
each half's attention reads the layout ``slice_metadata`` cuts from the step's. The Triton kernels (the
interpreter on the CPU) over the halves, one after the other, must give the float64 dense attention of the
whole batch, wherever the cut falls (among the decodes, at their end, among the prefills)."""
from __future__ import annotations

import pytest
import torch

from aphrodite.kernels.paged_attention import TritonAttentionBackend
from aphrodite.kernels.triton_utils import HAS_TRITON
from aphrodite.worker.step_inputs import slice_metadata
from tests.kernels.test_kernel_paged_attention import MIXED, TOL, check, dense_attention, make_case


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("split", [2, 3, 4])
def test_halves_of_a_mixed_batch_match_dense_attention(split: int, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.cuda.is_available()
    if not cuda:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if cuda else "cpu")
    case = make_case(**MIXED, num_kv_heads=2, group=2, head_dim=32, page=16, dtype=torch.float32, device=device)
    meta, t = case.meta, case.meta.query_start_loc_cpu[split]
    outs = []
    for first, last, tokens in ((0, split, slice(0, t)), (split, meta.num_seqs, slice(t, None))):
        part = slice_metadata(meta, first, last)
        assert part.num_decodes == max(0, min(meta.num_decodes, last) - first)
        outs.append(TritonAttentionBackend.forward(case.q[tokens], case.k_new[tokens], case.v_new[tokens],
                                                   case.k_cache, case.v_cache, part, 0.125))
    check(torch.cat(outs), dense_attention(case, 0.125), *TOL[torch.float32])
