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


@pytest.mark.parametrize(("kv_heads", "max_len", "group", "head_dim"),
                         [(4, 131072, 4, 128), (8, 4096, 8, 128), (1, 1023, 1, 64), (8, 8192, 2, 256),
                          (2, 4096, 7, 128)])
def test_mixed_step_layouts_meet_every_decode_variant(kv_heads: int, max_len: int, group: int, head_dim: int) -> None:
    """Every (decode-count class, split-KV bound) that any mixed step of up to 1024 decodes and any context
    can launch, found by brute force, is met by one of the few layouts compiled ahead; so is every
    (prefill sequence-count class, prefill tile) pair."""
    from aphrodite.kernels.paged_attention import _prefill_tiles, choose_num_splits
    from aphrodite.kernels.triton_utils import next_pow2
    from aphrodite.worker.model_runner import mixed_step_layouts

    def cls(n: int) -> str:
        return "one" if n == 1 else "x16" if n % 16 == 0 else "other"

    cpu = torch.device("cpu")   # choose_num_splits counts 132 SMs off the GPU, as the test passes
    layouts = mixed_step_layouts(kv_heads, 1024, max_len, 132, group, head_dim)
    got = {(cls(nd), next_pow2(choose_num_splits(nd, kv_heads, length, cpu))) for nd, length, _, _ in layouts}
    every = {(cls(nd), next_pow2(choose_num_splits(nd, kv_heads, length, cpu)))
             for nd in range(1, 1025) for length in range(1, max_len + 1, 97)}
    assert got == every and len(layouts) <= 24
    d_pad = next_pow2(head_dim)
    assert {(cls(nseq), _prefill_tiles(group, d_pad, chunk)) for _, _, nseq, chunk in layouts} == \
        {(cls(nseq), _prefill_tiles(group, d_pad, q)) for nseq in (1, 2, 16, 17, 32) for q in range(2, 2048)}
