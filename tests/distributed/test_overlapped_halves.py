"""``communication.run_overlapped``: two halves on two threads, switching at every TP all-reduce (issued
asynchronously). On two gloo ranks the halves' results equal the same functions run one after the other,
the all-reduces stay matched across ranks although each rank's halves differ in their values, and an
error in the helper thread's half reaches the caller."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.distributed.spawn import spawn_ranks


def _layers(x: torch.Tensor, depth: int) -> torch.Tensor:
    from aphrodite.distributed.communication import tensor_model_parallel_all_reduce

    for i in range(depth):
        x = tensor_model_parallel_all_reduce(x * (i + 2) + 1)
    return x


def _check(rank: int, world_size: int, init_method: str) -> None:
    from aphrodite.distributed.communication import run_overlapped
    from aphrodite.distributed.parallel_state import init_distributed

    init_distributed(world_size, rank, tp_size=2, backend="gloo", init_method=init_method)
    a, b = torch.full((4,), 1.0 + rank), torch.arange(6.0) * (rank + 1)
    want = (_layers(a.clone(), 3), _layers(b.clone(), 3))
    got = run_overlapped(lambda: _layers(a.clone(), 3), lambda: _layers(b.clone(), 3))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    def failing() -> torch.Tensor:
        _layers(b.clone(), 1)
        raise ValueError("half B failed")
    try:
        run_overlapped(lambda: _layers(a.clone(), 1), failing)
    except ValueError as e:
        assert str(e) == "half B failed"
    else:
        raise AssertionError("the helper thread's error was lost")


def test_overlapped_halves_match_sequential_halves(tmp_path: Path) -> None:
    spawn_ranks(_check, 2, tmp_path)
