"""Kernel tests: compiled Triton on a CUDA machine, Triton's CPU interpreter everywhere else.

``TRITON_INTERPRET=1`` is set per test (not at import) so it does not leak into other test folders:
the kernels pick compiled vs interpreted form at launch time (``aphrodite.kernels.triton_utils``).
"""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")
