"""vLLM's batch defaults, chosen by device and use: a script moved from vLLM batches the same."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aphrodite.config import create_engine_config, default_batch_limits
from aphrodite.engine_args import EngineArgs

GiB = 1 << 30


@pytest.mark.parametrize("name, memory, usage, expected", [
    ("NVIDIA H200", 141 * GiB, "llm", (16384, 1024)),
    ("NVIDIA H100 80GB HBM3", 80 * GiB, "server", (8192, 1024)),
    ("NVIDIA A100-SXM4-80GB", 80 * GiB, "llm", (8192, 256)),     # vLLM measured a loss there
    ("NVIDIA L4", 24 * GiB, "server", (8192, 256)),
])
def test_gpu_defaults_follow_vllm(monkeypatch: pytest.MonkeyPatch, name: str, memory: int, usage: str,
                                  expected: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(name=name,
                                                                                         total_memory=memory))
    assert default_batch_limits(torch.device("cuda", 0), usage) == expected


def test_cpu_defaults_and_explicit_values_win(tiny_llama_dir: str) -> None:
    assert default_batch_limits(torch.device("cpu"), "server") == (2048, 256)
    config = create_engine_config(EngineArgs(model=tiny_llama_dir, device="cpu"))
    assert (config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs) == (2048, 256)
    config = create_engine_config(EngineArgs(model=tiny_llama_dir, device="cpu", max_num_seqs=7,
                                             max_num_batched_tokens=300))
    assert (config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs) == (300, 7)
    with pytest.raises(ValueError, match="max_num_seqs must be at least 1"):
        create_engine_config(EngineArgs(model=tiny_llama_dir, device="cpu", max_num_seqs=-1))
