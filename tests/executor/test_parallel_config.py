"""tp x pp is checked before anything starts, with messages that say what to change; the default
model runs split into pipeline stages."""
from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from aphrodite import LLM, SamplingParams
from aphrodite.config import create_engine_config
from aphrodite.engine_args import EngineArgs


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(tensor_parallel_size=3), r"attention heads \(4\) must be divisible by tensor parallel size \(3\)"),
    (dict(pipeline_parallel_size=3), r"pipeline_parallel_size \(3\) is larger than the model's number of layers"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), r"'uni' runs a single rank"),
    (dict(tensor_parallel_size=0), "must be at least 1"),
])
def test_invalid_splits_are_refused_before_start(tiny_llama_dir: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_engine_config(EngineArgs(model=tiny_llama_dir, device="cpu", **kwargs))


def test_backend_defaults(tiny_llama_dir: str) -> None:
    def backend(**kw) -> str:
        return create_engine_config(EngineArgs(model=tiny_llama_dir, device="cpu", **kw)).parallel \
            .distributed_executor_backend
    assert backend() == "uni"
    assert backend(tensor_parallel_size=2) == "mp"
    assert backend(pipeline_parallel_size=2, distributed_executor_backend="ray") == "ray"


def test_kv_heads_fewer_than_ranks_are_replicated_not_refused(tiny_llama_dir: str) -> None:
    config = create_engine_config(EngineArgs(model=tiny_llama_dir, device="cpu", tensor_parallel_size=4))
    assert config.parallel.world_size == 4    # 2 KV heads over 4 ranks: each one held by two ranks


def test_default_model(default_gguf_path: str, default_gguf_hf_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2-135M has 9 attention heads: TP=2 is refused up front. Two pipeline stages (15 layers
    each, GGUF weights dequantized per stage) give transformers' greedy tokens and text."""
    with pytest.raises(ValueError, match=r"attention heads \(9\) must be divisible by tensor parallel size \(2\)"):
        LLM(device="cpu", tensor_parallel_size=2)
    # The worker processes started while the configuration was resolved are gone with the error.
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("AphroditeWorker")]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    llm = LLM(device="cpu", pipeline_parallel_size=2, max_model_len=256, num_gpu_blocks_override=64)
    try:
        prompts = ["The capital of France is", "def fibonacci(n):"]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        for out in outs:
            ids = out.prompt_token_ids
            ref = default_gguf_hf_model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()
            assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids,
                                                                     skip_special_tokens=True)
    finally:
        llm.llm_engine.shutdown()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"   # set for every process the executor starts
