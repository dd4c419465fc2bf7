"""Whole tiny Llama checkpoints in every quantized format, config.json as the tools write it, load through
``LLM`` and generate the same greedy tokens as transformers running the weights they stand for."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from aphrodite import LLM, SamplingParams
from tests.conftest import make_tiny_hf_model
from tests.quantization.formats import FORMATS, write_quantized_checkpoint


def write_quantized_llama(directory: Path, fmt: str) -> torch.nn.Module:
    """A tiny random Llama saved in ``fmt``; returns transformers' model holding the dequantized weights."""
    return write_quantized_checkpoint(make_tiny_hf_model(), directory, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_matches_dequantized_transformers(tmp_path, fmt):
    hf = write_quantized_llama(tmp_path / fmt, fmt)
    llm = LLM(str(tmp_path / fmt), device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
              quantization="fp8" if fmt == "fp8_online" else None)
    model = llm.llm_engine.executor.runner.model
    assert type(model.model.layers[0].mlp.down_proj.quant_method).__name__ != "UnquantizedLinearMethod"
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (5, 17, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_requested_method_must_match_checkpoint(tmp_path):
    write_quantized_llama(tmp_path / "m", "awq")
    with pytest.raises(ValueError, match="checkpoint is quantized with 'awq'"):
        LLM(str(tmp_path / "m"), device="cpu", skip_tokenizer_init=True, quantization="gptq")
    # vLLM's kernel-specific spelling names the same format
    LLM(str(tmp_path / "m"), device="cpu", skip_tokenizer_init=True, quantization="awq_marlin", max_model_len=64)


def test_int4_needs_a_quantized_checkpoint(tiny_llama_dir):
    with pytest.raises(ValueError, match="cannot be quantized to AWQ at load"):
        LLM(tiny_llama_dir, device="cpu", skip_tokenizer_init=True, quantization="awq")


def test_tensor_parallel_gptq_act_order(tmp_path):
    """Two CPU ranks (gloo): each holds its shard of the act-order layers (row-parallel ones with whole
    scales and uneven groups); greedy tokens still equal transformers on the dequantized weights."""
    hf = write_quantized_llama(tmp_path / "m", "gptq_actorder")
    llm = LLM(str(tmp_path / "m"), device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
              tensor_parallel_size=2)
    prompt = [5, 17, 200, 31, 8, 99, 12]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert out[0].outputs[0].token_ids == ref[0, len(prompt):].tolist()
