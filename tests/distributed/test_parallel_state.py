"""TP and PP groups of ``init_distributed`` and their collectives.

``check_tp2_pp2_groups`` runs in each of the 4 gloo processes of
``test_pipeline_model.py::test_tp2_pp2_groups_and_model_match_hf`` (one spawn for both checks).
"""
from __future__ import annotations

import os

import pytest
import torch

from aphrodite.distributed import parallel_state as ps
from aphrodite.distributed.communication import (
    pp_recv_tensors,
    pp_send_tensors,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)


def check_tp2_pp2_groups(rank: int) -> None:
    """In rank ``rank`` of a TP=2 x PP=2 world just built by ``init_distributed``."""
    for key, value in ps.MULTICAST_OFF_ENV.items():
        assert os.environ[key] == value
    tp_rank, pp_rank = rank % 2, rank // 2
    assert (ps.get_tp_rank(), ps.get_tp_size(), ps.get_pp_rank(), ps.get_pp_size()) == (tp_rank, 2, pp_rank, 2)
    assert ps.get_tensor_model_parallel_rank() == tp_rank and ps.get_tensor_model_parallel_world_size() == 2
    assert ps.is_first_pp_rank() == (pp_rank == 0) and ps.is_last_pp_rank() == (pp_rank == 1)
    # TP collectives stay inside the stage: stage 0 holds ranks {0, 1}, stage 1 ranks {2, 3}.
    x = torch.full((3,), float(rank + 1))
    assert torch.equal(tensor_model_parallel_all_reduce(x), torch.full((3,), float(2 * (2 * pp_rank + 1) + 1)))
    y = torch.arange(4.0).reshape(2, 2) + 10 * rank
    stage = [torch.arange(4.0).reshape(2, 2) + 10 * (2 * pp_rank + t) for t in range(2)]
    assert torch.equal(tensor_model_parallel_all_gather(y, dim=-1), torch.cat(stage, dim=-1))
    assert torch.equal(tensor_model_parallel_all_gather(y, dim=0), torch.cat(stage, dim=0))
    # PP: rank r of stage 0 sends to rank r + tp_size, whatever order the dict lists its tensors.
    if pp_rank == 0:
        pp_send_tensors({"residual": torch.full((5, 4), -float(rank)),
                         "hidden_states": torch.full((5, 4), float(rank))})
        with pytest.raises(RuntimeError, match="previous stage"):
            pp_recv_tensors({"hidden_states": ((5, 4), torch.float32)})
    else:
        got = pp_recv_tensors({"hidden_states": ((5, 4), torch.float32), "residual": ((5, 4), torch.float32)})
        assert torch.equal(got["hidden_states"], torch.full((5, 4), float(rank - 2)))
        assert torch.equal(got["residual"], torch.full((5, 4), -float(rank - 2)))
        with pytest.raises(RuntimeError, match="next stage"):
            pp_send_tensors({"hidden_states": got["hidden_states"]})


def test_init_distributed_rejects_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="world_size .4. must equal"):
        ps.init_distributed(4, 0, tp_size=2, pp_size=1, backend="gloo")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        ps.init_distributed(2, 2, tp_size=2, pp_size=1, backend="gloo")


def test_model_parallel_ranks_restores() -> None:
    with ps.model_parallel_ranks(tp_rank=1, tp_size=2, pp_rank=2, pp_size=3):
        assert (ps.get_tp_rank(), ps.get_tp_size(), ps.get_pp_rank(), ps.get_pp_size()) == (1, 2, 2, 3)
        assert ps.is_last_pp_rank() and not ps.is_first_pp_rank()
    assert (ps.get_tp_rank(), ps.get_tp_size(), ps.get_pp_rank(), ps.get_pp_size()) == (0, 1, 0, 1)
