"""The CPU decode stack in one C call (``gguf_decode``) for GGUF models with one block type per projection.

A tiny two-layer Llama GGUF with a different block type in each projection (Q4_0/Q4_1/Q8_0 and
K-quants) is decoded with the C stack and with the module path: greedy tokens and logprobs must be
bit-identical (the stack calls the same kernels in the same order), and the tokens those of the
file dequantized at load (the independent reference, itself checked against transformers).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.kernels.cpu import gguf_ops
from aphrodite.modeling.layers.quantization import gguf as gguf_method
from aphrodite.modeling.layers.quantization import gguf_decode
from tests.quantization.test_gguf_model import PROMPTS, write_tiny_gguf

pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not gguf_ops.available(__import__("torch").float32), reason="no C kernels")

UNIFORM = [
    {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q8_0",
     "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
    {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q5_K",
     "ffn_gate": "Q8_0", "ffn_up": "Q8_0", "ffn_down": "Q4_1"},
]


def _generate(llm: LLM, fused: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list, int]:
    calls = []
    run = gguf_decode._Plan.run

    def counted(self, hidden, *args, **kwargs):
        calls.append(hidden.shape[0])
        return run(self, hidden, *args, **kwargs)
    monkeypatch.setattr(gguf_decode._Plan, "run", counted)
    monkeypatch.setattr(gguf_decode, "ENABLED", fused)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, detokenize=False)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp, use_tqdm=False)
    one = llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=sp, use_tqdm=False)
    rows = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs + one]
    return rows, len(calls)


@pytest.mark.parametrize("dtype,q8", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_fused_stack_equals_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, q8: bool):
    monkeypatch.setattr(gguf_method, "CPU_Q8_ACTIVATIONS", q8)
    path = write_tiny_gguf(tmp_path / "uniform.gguf", layer_types=UNIFORM)
    llm = LLM(str(path), device="cpu", dtype=dtype, skip_tokenizer_init=True, max_model_len=128,
              enable_prefix_caching=False)
    fused, n_fused = _generate(llm, True, monkeypatch)
    module, n_module = _generate(llm, False, monkeypatch)
    assert n_fused >= 10 and n_module == 0   # 3-row and 1-row decode steps went through the C stack
    assert fused == module
    if dtype == "float32" and not q8:
        deq = LLM(str(path), device="cpu", dtype=dtype, skip_tokenizer_init=True, max_model_len=128,
                  quantization="none")
        ref, _ = _generate(deq, False, monkeypatch)
        assert [r[0] for r in fused] == [r[0] for r in ref]


LEGACY = [
    {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q8_0",
     "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q4_1"},
    {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q4_1",
     "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_0"},
]


@pytest.mark.skipif(not gguf_ops.gemm_available(), reason="no AVX-512 VNNI build")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_stack_many_rows_equals_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str):
    """Decode of more rows than the GEMV takes: every projection takes a blocked GEMM (8-bit activations
    in bfloat16, float ones in float32), in the C stack as in the modules, so tokens and logprobs are
    bit-identical; a model with a K-quant projection leaves those steps to the module path."""
    monkeypatch.setattr(gguf_method, "CPU_Q8_ACTIVATIONS", False)
    monkeypatch.setattr(gguf_method, "CPU_Q8_BATCH_BF16", True)
    rows = gguf_method.cpu_gemv_max_rows(getattr(__import__("torch"), dtype)) + 4
    prompts = [[1, 7 + i, 30 + 2 * i, 90 - i] for i in range(rows)]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, detokenize=False)
    results = []
    run = gguf_decode._Plan.run
    for types in (LEGACY, UNIFORM):
        llm = LLM(str(write_tiny_gguf(tmp_path / f"m{len(results)}.gguf", layer_types=types)), device="cpu",
                  dtype=dtype, skip_tokenizer_init=True, max_model_len=128, enable_prefix_caching=False)
        for fused in (True, False):
            calls = []
            monkeypatch.setattr(gguf_decode._Plan, "run", lambda self, h, *a, _calls=calls, **k: (
                _calls.append(h.shape[0]), run(self, h, *a, **k))[1])
            monkeypatch.setattr(gguf_decode, "ENABLED", fused)
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
            results.append(([(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()}
                                                        for d in o.outputs[0].logprobs]) for o in outs], calls))
    (legacy_fused, legacy_calls), (legacy_module, _), (_, kquant_calls), _ = results
    assert legacy_fused == legacy_module
    assert rows in legacy_calls and rows not in kquant_calls


def test_mixed_types_take_the_module_path(tmp_path: Path):
    """q/k/v of three block types (three kernel calls): not a layer the C stack describes."""
    assert not gguf_decode.eligible(_decoder_model(write_tiny_gguf(tmp_path / "mixed.gguf")))


def _decoder_model(path: Path):
    import torch

    from aphrodite.config import create_engine_config
    from aphrodite.engine_args import EngineArgs
    from aphrodite.modeling.loader import load_model
    cfg = create_engine_config(EngineArgs(model=str(path), device="cpu", dtype="float32", skip_tokenizer_init=True))
    return load_model(cfg.model, torch.device("cpu")).model


def test_uniform_model_is_eligible(tmp_path: Path):
    assert gguf_decode.eligible(_decoder_model(write_tiny_gguf(tmp_path / "u.gguf", layer_types=UNIFORM)))
