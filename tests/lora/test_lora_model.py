"""LoRA layers against peft: each adapter's logits, and a batch mixing base and two adapters in one pass.

Our Llama with its linear layers wrapped by ``LoRAManager`` runs one flat batch through the paged
KV cache; each sequence's logits must equal peft's (transformers + the adapter) for that sequence.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from aphrodite.config import ModelConfig
from aphrodite.lora.layers import LoRALinear
from aphrodite.lora.manager import LoRAManager
from aphrodite.lora.request import LoRARequest
from aphrodite.modeling.layers.attention import Attention, AttentionMetadata, set_attention_metadata
from aphrodite.modeling.loader import load_model

BLOCK = 16
ATOL = 2e-4


def _our_model(path: str, max_loras: int = 2, max_rank: int = 8) -> tuple[torch.nn.Module, LoRAManager]:
    hf = AutoConfig.from_pretrained(path)
    cfg = ModelConfig(model=path, path=path, hf_config=hf, dtype=torch.float32, max_model_len=256,
                      load_format="safetensors", gguf_file=None, tokenizer=path, tokenizer_revision=None,
                      skip_tokenizer_init=True, seed=0, max_logprobs=20)
    model = load_model(cfg, torch.device("cpu"))
    manager = LoRAManager(model, max_loras, max_rank, 4, 512, torch.device("cpu"), torch.float32)
    for module in model.modules():
        if isinstance(module, Attention):
            shape = (32, BLOCK, module.num_kv_heads, module.head_dim)
            module.kv_cache = (torch.zeros(shape), torch.zeros(shape))
    return model, manager


def _prefill(model: torch.nn.Module, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One forward pass prefilling every sequence (each in its own blocks); logits per sequence."""
    starts, slots, tables, block = [0], [], [], 0
    for s in seqs:
        n = -(-len(s) // BLOCK)
        tables.append(list(range(block, block + n)))
        slots += [(block + p // BLOCK) * BLOCK + p % BLOCK for p in range(len(s))]
        block += n
        starts.append(starts[-1] + len(s))
    lens = [len(s) for s in seqs]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        num_decodes=0, query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_query_len=max(lens), max_seq_len=max(lens), max_decode_seq_len=0,
        query_start_loc_cpu=starts, seq_lens_cpu=lens)
    with torch.inference_mode(), set_attention_metadata(meta):
        hidden = model(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens]))
        logits = model.compute_logits(hidden)
    return list(logits.split(lens))


@pytest.fixture
def reference(peft_model):
    def run(base: str, adapter: str | None, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return peft_model(base, adapter)(ids[None]).logits[0].float()
    return run


def test_mixed_batch_matches_peft(tiny_llama_dir: str, lora_dirs: dict[str, str], reference) -> None:
    model, manager = _our_model(tiny_llama_dir)
    manager.add_lora(LoRARequest("sql", 1, lora_dirs["sql"]))
    manager.add_lora(LoRARequest("poet", 2, lora_dirs["poet"]))
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 320, (n,), generator=gen) for n in (21, 9, 30, 17)]
    lora_ids = [0, 1, 2, 1]
    refs = [reference(tiny_llama_dir, lora_dirs[name] if name else None, s)
            for s, name in zip(seqs, [None, "sql", "poet", "sql"])]
    # The adapters really change the logits: the check below could not pass with LoRA ignored.
    assert (refs[1] - reference(tiny_llama_dir, None, seqs[1])).abs().max() > 0.05
    manager.set_step(lora_ids, [len(s) for s in seqs])
    for got, ref in zip(_prefill(model, seqs), refs):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # Each alone equals its part of the mixed batch (and peft).
    for s, lid, ref in zip(seqs, lora_ids, refs):
        manager.set_step([lid], [len(s)])
        torch.testing.assert_close(_prefill(model, [s])[0], ref, atol=ATOL, rtol=0)


def test_embedding_and_lm_head_adapter_matches_peft(tiny_llama_dir: str, lora_dirs: dict[str, str], reference) -> None:
    """PEFT's ``lora_embedding_A/B`` and an ``lm_head`` LoRA; the runner names each logits row's adapter."""
    model, manager = _our_model(tiny_llama_dir)
    manager.add_lora(LoRARequest("vocab", 3, lora_dirs["vocab"]))
    manager.add_lora(LoRARequest("sql", 1, lora_dirs["sql"]))
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 320, (n,), generator=gen) for n in (11, 14, 6)]
    ids = [3, 0, 1]
    manager.set_step(ids, [len(s) for s in seqs])
    manager.set_logit_rows([i for i, s in zip(ids, seqs) for _ in range(len(s))])
    refs = [reference(tiny_llama_dir, lora_dirs[n] if n else None, s) for s, n in zip(seqs, ["vocab", None, "sql"])]
    assert (refs[0] - reference(tiny_llama_dir, None, seqs[0])).abs().max() > 0.05
    for got, ref in zip(_prefill(model, seqs), refs):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_slot_lru_reloads_evicted_adapters(tiny_llama_dir: str, lora_dirs: dict[str, str], reference) -> None:
    """One device slot and one host copy: alternating adapters evicts and reloads them, results unchanged."""
    model, manager = _our_model(tiny_llama_dir, max_loras=1)
    manager.max_cpu_loras = 1
    manager.add_lora(LoRARequest("sql", 1, lora_dirs["sql"]))
    manager.add_lora(LoRARequest("poet", 2, lora_dirs["poet"]))
    assert list(manager.host) == [2]
    ids = torch.randint(3, 320, (12,), generator=torch.Generator().manual_seed(3))
    for lid, name in [(1, "sql"), (2, "poet"), (1, "sql")]:
        manager.set_step([lid], [len(ids)])
        assert list(manager.slot_of) == [lid]
        torch.testing.assert_close(_prefill(model, [ids])[0], reference(tiny_llama_dir, lora_dirs[name], ids),
                                   atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="max_loras"):
        manager.set_step([1, 2], [1, 1])


def test_bad_adapters_are_value_errors(tiny_llama_dir: str, lora_dirs: dict[str, str], tmp_path: Path) -> None:
    _, manager = _our_model(tiny_llama_dir, max_rank=4)
    with pytest.raises(ValueError, match="LoRA rank 8 of adapter 'poet' is greater than max_lora_rank 4"):
        manager.add_lora(LoRARequest("poet", 2, lora_dirs["poet"]))
    missing = tmp_path / "no_weights"
    shutil.copytree(lora_dirs["sql"], missing)
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="No adapter_model.safetensors"):
        manager.add_lora(LoRARequest("x", 3, str(missing)))
    with pytest.raises(ValueError, match="does not exist"):
        manager.add_lora(LoRARequest("y", 4, str(tmp_path / "nowhere")))
    saved = tmp_path / "saved"
    shutil.copytree(lora_dirs["sql"], saved)
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="modules_to_save"):
        manager.add_lora(LoRARequest("z", 5, str(saved)))
    assert manager.list_loras() == set()


def test_small_step_triton_path_matches_peft(tiny_llama_dir: str, lora_dirs: dict[str, str], reference,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of at most ``TILE_MAX_TOKENS`` tokens on the Triton path (CPU interpreter): every slot's A
    rows appended to the base weights, one expand per layer, row-strided layer outputs flowing into
    the model's own kernels; base and two adapters in one batch, each equal to peft."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, manager = _our_model(tiny_llama_dir)
    assert all(w.weight_cat is not None for w, _ in manager.layers if isinstance(w, LoRALinear))
    manager.add_lora(LoRARequest("sql", 1, lora_dirs["sql"]))
    manager.add_lora(LoRARequest("poet", 2, lora_dirs["poet"]))
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 320, (n,), generator=gen) for n in (9, 7, 6)]
    lora_ids = [1, 0, 2]
    manager.set_step(lora_ids, [len(s) for s in seqs])
    for got, s, name in zip(_prefill(model, seqs), seqs, ["sql", None, "poet"]):
        torch.testing.assert_close(got, reference(tiny_llama_dir, lora_dirs[name] if name else None, s),
                                   atol=ATOL, rtol=0)
