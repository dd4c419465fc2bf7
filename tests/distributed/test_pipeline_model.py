"""Pipeline and tensor parallelism at the model level, against Hugging Face transformers.

In-process: each pipeline stage is built as its own rank (``model_parallel_ranks``) and the
stages are chained by hand, so PP=2 and PP=3 need no processes. Spawned (gloo): TP=2 x PP=2
in four processes, with real sends between the stages and all-reduces inside them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from spawn import spawn_ranks

from aphrodite.distributed import parallel_state as ps
from aphrodite.distributed.communication import pp_recv_tensors, pp_send_tensors
from aphrodite.modeling.layers.attention import set_attention_metadata
from aphrodite.modeling.loader import load_model
from aphrodite.modeling.models.pipeline import (
    IntermediateTensors,
    PPMissingLayer,
    get_pp_layer_range,
    intermediate_tensor_spec,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "modeling"))
from test_llama import ATOL, bind_kv_cache, build_metadata, hf_logits, model_config  # noqa: E402

PROMPT = torch.arange(3, 23)   # 20 tokens: a 19-token prefill, then one decode step
STEPS = [(slice(0, 19), [([1, 0], 0, 19)]), (slice(19, 20), [([1, 0], 19, 1)])]


@pytest.fixture(scope="module")
def three_layer_dir(tiny_hf_model_factory, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Untied, 3 layers (an uneven PP=2 split), 2 KV heads (split by TP=2)."""
    path = tmp_path_factory.mktemp("llama3layers")
    tiny_hf_model_factory(num_hidden_layers=3, seed=5).save_pretrained(path)
    return str(path)


def _hf_reference(path: str) -> torch.Tensor:
    from transformers import LlamaForCausalLM as HFLlama
    return hf_logits(HFLlama.from_pretrained(path).float().eval(), PROMPT)


def test_layer_ranges_split_evenly_extra_before_last() -> None:
    assert [get_pp_layer_range(32, r, 3) for r in range(3)] == [(0, 11), (11, 22), (22, 32)]
    assert [get_pp_layer_range(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert get_pp_layer_range(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError, match="larger than the number of layers"):
        get_pp_layer_range(2, 0, 3)


def _stages(path: str, pp_size: int) -> list[torch.nn.Module]:
    stages = []
    for rank in range(pp_size):
        with ps.model_parallel_ranks(pp_rank=rank, pp_size=pp_size):
            stage = load_model(model_config(path), torch.device("cpu"))
        bind_kv_cache(stage)
        stages.append(stage)
    return stages


def _run_chained(stages: list[torch.nn.Module]) -> torch.Tensor:
    logits = []
    for rows, seqs in STEPS:
        ids = PROMPT[rows]
        positions = torch.arange(rows.start, rows.stop)
        out = None
        with torch.inference_mode(), set_attention_metadata(build_metadata(seqs)):
            for rank, stage in enumerate(stages):
                with ps.model_parallel_ranks(pp_rank=rank, pp_size=len(stages)):
                    out = stage(ids, positions, out)
                    is_last = rank == len(stages) - 1
                    assert isinstance(out, torch.Tensor) == is_last
            logits.append(stages[-1].compute_logits(out))
    return torch.cat(logits)


@pytest.mark.parametrize("pp_size", [2, 3])
def test_pipeline_stages_match_hf(three_layer_dir: str, pp_size: int) -> None:
    stages = _stages(three_layer_dir, pp_size)
    names = [{n for n, _ in s.named_parameters()} for s in stages]
    assert "model.embed_tokens.weight" in names[0] and not any("embed" in n for s in names[1:] for n in s)
    assert all("lm_head.weight" not in s and "model.norm.weight" not in s for s in names[:-1])
    assert {"lm_head.weight", "model.norm.weight"} <= names[-1]
    layers = [sorted({int(n.split(".")[2]) for n in s if n.startswith("model.layers.")}) for s in names]
    assert layers == {2: [[0, 1], [2]], 3: [[0], [1], [2]]}[pp_size]
    assert isinstance(stages[0].model.layers[2], PPMissingLayer)
    torch.testing.assert_close(_run_chained(stages), _hf_reference(three_layer_dir), atol=ATOL, rtol=0)


def test_pipeline_stages_of_gemma2_match_hf(tmp_path: Path) -> None:
    """A stage boundary after a sandwich layer: a stage applies its last layer's post-feed-forward norm
    (fused into the next add + norm within a stage) before handing its hidden states on."""
    from aphrodite.benchmarks.tiny_families import make_hf_model
    hf = make_hf_model("gemma2")
    assert hf.config.num_hidden_layers == 2
    hf.save_pretrained(tmp_path)
    stages = _stages(str(tmp_path), 2)
    torch.testing.assert_close(_run_chained(stages), hf_logits(hf, PROMPT), atol=ATOL, rtol=0)


def test_pipeline_tied_embedding_lives_on_first_and_last(tiny_llama_tied_dir: str) -> None:
    stages = _stages(tiny_llama_tied_dir, 2)
    for stage in stages:   # one table on each stage: the first looks tokens up, the last computes logits
        assert stage.lm_head is stage.model.embed_tokens and not isinstance(stage.lm_head, PPMissingLayer)
    torch.testing.assert_close(_run_chained(stages), _hf_reference(tiny_llama_tied_dir), atol=ATOL, rtol=0)


def test_untied_last_stage_takes_the_embedding_when_the_checkpoint_has_no_lm_head(three_layer_dir: str) -> None:
    from safetensors.torch import load_file
    weights = load_file(str(Path(three_layer_dir) / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    with ps.model_parallel_ranks(pp_rank=1, pp_size=2):
        from aphrodite.modeling.loader import build_model
        stage = build_model(model_config(three_layer_dir), torch.device("cpu"))
        loaded = stage.load_weights((n, t) for n, t in weights.items() if n != "lm_head.weight")
    assert loaded == {n for n, _ in stage.named_parameters()}
    assert torch.equal(stage.lm_head.weight, embed)


def _tp_pp_worker(rank: int, world_size: int, init_method: str, path: str, out: str) -> None:
    from test_parallel_state import check_tp2_pp2_groups
    ps.init_distributed(world_size, rank, tp_size=2, pp_size=2, backend="gloo", init_method=init_method)
    check_tp2_pp2_groups(rank)
    model = load_model(model_config(path), torch.device("cpu"))
    bind_kv_cache(model)
    hidden_size = model.config.hidden_size
    logits = []
    for rows, seqs in STEPS:
        ids, positions = PROMPT[rows], torch.arange(rows.start, rows.stop)
        with torch.inference_mode(), set_attention_metadata(build_metadata(seqs)):
            if ps.is_first_pp_rank():
                sent = model(ids, positions)
                pp_send_tensors(sent.to_dict())
            else:
                spec = intermediate_tensor_spec(len(ids), hidden_size, torch.float32)
                received = IntermediateTensors.from_dict(pp_recv_tensors(spec))
                logits.append(model.compute_logits(model(ids, positions, received)))
    if ps.is_last_pp_rank() and ps.get_tp_rank() == 0:
        torch.save(torch.cat(logits), out)
    torch.distributed.barrier()
    ps.destroy_distributed()
    assert not torch.distributed.is_initialized()
    assert (ps.get_tp_size(), ps.get_pp_size(), ps.get_tp_rank()) == (1, 1, 0)


def test_tp2_pp2_groups_and_model_match_hf(three_layer_dir: str, tmp_path: Path) -> None:
    """Four gloo processes: the groups and collectives (``check_tp2_pp2_groups``), then the model
    with real sends between the stages and all-reduces inside them."""
    out = tmp_path / "logits.pt"
    spawn_ranks(_tp_pp_worker, 4, tmp_path, three_layer_dir, str(out))
    torch.testing.assert_close(torch.load(out), _hf_reference(three_layer_dir), atol=ATOL, rtol=0)
