"""Each tensor-parallel rank reads only its shard of a safetensors checkpoint, and each pipeline
stage only its own layers: the reads are recorded by wrapping the slices safetensors hands out."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aphrodite.config import ModelConfig
from aphrodite.distributed.parallel_state import model_parallel_ranks
from aphrodite.modeling.loader import load_model, safetensors_loader


class _RecordingSlice:
    def __init__(self, name: str, real: Any, reads: list[tuple[str, int]]) -> None:
        self.name, self.real, self.reads = name, real, reads

    def get_shape(self) -> list[int]:
        return self.real.get_shape()

    def get_dtype(self) -> str:
        return self.real.get_dtype()

    def __getitem__(self, index: Any) -> torch.Tensor:
        out = self.real[index]
        self.reads.append((self.name, out.numel()))
        return out


class _RecordingFile:
    def __init__(self, path: str, reads: list[tuple[str, int]], **kwargs: Any) -> None:
        self.real, self.reads = safe_open(path, **kwargs), reads

    def keys(self) -> list[str]:
        return self.real.keys()

    def get_slice(self, name: str) -> _RecordingSlice:
        return _RecordingSlice(name, self.real.get_slice(name), self.reads)

    def get_tensor(self, name: str) -> torch.Tensor:
        raise AssertionError(f"whole tensor {name} read")


def _load_recorded(path: str, monkeypatch: pytest.MonkeyPatch, **ranks: int) -> tuple[Any, list[tuple[str, int]]]:
    from transformers import AutoConfig
    reads: list[tuple[str, int]] = []
    monkeypatch.setattr(safetensors_loader, "safe_open", lambda p, **kw: _RecordingFile(p, reads, **kw))
    hf = AutoConfig.from_pretrained(path)
    config = ModelConfig(model=path, path=path, hf_config=hf, dtype=torch.float32, max_model_len=256,
                         load_format="safetensors", gguf_file=None, tokenizer=path, tokenizer_revision=None,
                         skip_tokenizer_init=True, seed=0, max_logprobs=20)
    with model_parallel_ranks(**ranks):
        model = load_model(config, torch.device("cpu"))
    return model, reads


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_tp_rank_reads_only_its_shard(tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch, tp_rank: int) -> None:
    full = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    model, reads = _load_recorded(tiny_llama_dir, monkeypatch, tp_rank=tp_rank, tp_size=2)
    # Every element read lands in a parameter: the rank reads what it holds, no more.
    assert sum(n for _, n in reads) == sum(p.numel() for p in model.parameters())
    for name, n in reads:
        if full[name].dim() == 2:   # every matrix is sharded by 2 (KV heads: 2 of them, one per rank)
            assert n == full[name].numel() // 2, name
        else:                       # norms are replicated
            assert n == full[name].numel(), name
    q = full["model.layers.1.self_attn.q_proj.weight"]
    o = full["model.layers.1.self_attn.o_proj.weight"]
    rows, cols = q.shape[0] // 2, o.shape[1] // 2
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv[:rows], q[tp_rank * rows:(tp_rank + 1) * rows])
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, o[:, tp_rank * cols:(tp_rank + 1) * cols])


def test_pp_stage_reads_only_its_layers(tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, reads = _load_recorded(tiny_llama_dir, monkeypatch, pp_rank=1, pp_size=2)
    names = {name for name, _ in reads}
    assert names == {n for n, _ in load_file(str(Path(tiny_llama_dir) / "model.safetensors")).items()
                     if n.startswith(("model.layers.1.", "model.norm.", "lm_head."))}
    assert sum(n for _, n in reads) == sum(p.numel() for p in model.parameters())


def test_lazy_tensor_views_equal_torch_indexing_and_read_only_their_block() -> None:
    from aphrodite.modeling.loader.lazy_tensor import LazyTensor
    full = torch.randn(4, 6, 8)
    read: list[int] = []

    def reader(slices: tuple[slice, ...]) -> torch.Tensor:
        block = full[slices].clone()
        read.append(block.numel())
        return block
    lazy = LazyTensor(reader, full.shape, full.dtype)
    views = {
        "narrow": (lazy.narrow(1, 2, 3).narrow(2, 4, 4), full.narrow(1, 2, 3).narrow(2, 4, 4)),
        "slices": (lazy[1:3, :, 2:], full[1:3, :, 2:]),
        "expert": (lazy[2].narrow(0, 3, 3), full[2].narrow(0, 3, 3)),
        "int inside": (lazy[:, 5], full[:, 5]),
        "split": (lazy.split([1, 3])[1], full.split([1, 3])[1]),
        "chunk": (lazy.chunk(2, dim=2)[1], full.chunk(2, dim=2)[1]),
    }
    for what, (view, expected) in views.items():
        assert isinstance(view, LazyTensor) and view.shape == expected.shape and not read, what
        dst = torch.empty(expected.shape)
        dst.copy_(view)   # what copy_into does: reads the block, and only it
        assert torch.equal(dst, expected) and read == [expected.numel()], what
        read.clear()
    # Anything else reads the block first, then behaves like the tensor.
    assert torch.equal(lazy[1].t(), full[1].t()) and torch.equal(lazy[0] + 1, full[0] + 1)
    assert torch.equal(torch.cat([lazy[0], lazy[3]]), torch.cat([full[0], full[3]]))
    assert torch.equal(lazy[..., 1], full[..., 1]) and lazy[0].to(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(IndexError):
        lazy.narrow(0, 3, 2)
