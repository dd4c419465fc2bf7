"""LoRA through the engine: ``LLM(enable_lora=True)`` greedy equals peft's greedy, per prompt's adapter.

The same prompt runs under the base model and both adapters in one ``generate`` call, so the prefix
cache would hand one adapter's KV blocks to another if block hashes ignored the adapter.
"""
from __future__ import annotations

import pytest
import torch

from aphrodite import LLM, LoRARequest, SamplingParams
from aphrodite.config import SchedulerConfig
from aphrodite.engine.kv_cache import KVCacheManager
from aphrodite.engine.request import Request
from aphrodite.engine.scheduler import Scheduler

MAX_TOKENS = 12


def _peft_greedy(peft_model, base: str, adapter: str | None, prompt: list[int]) -> list[int]:
    model = peft_model(base, adapter)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_generate_with_adapters_matches_peft(tiny_llama_dir, lora_dirs, peft_model):
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 320, (20,), generator=gen).tolist()     # 20 tokens: one full block of 16
    other = torch.randint(3, 320, (7,), generator=gen).tolist()
    sql, poet = LoRARequest("sql", 1, lora_dirs["sql"]), LoRARequest("poet", 2, lora_dirs["poet"])
    vocab = LoRARequest("vocab", 3, lora_dirs["vocab"])      # embedding + LM head: waits for one of two slots
    prompts = [shared, shared, shared, other, other, other]
    loras = [None, sql, poet, poet, sql, vocab]
    llm = LLM(tiny_llama_dir, enable_lora=True, max_loras=2, max_lora_rank=8, skip_tokenizer_init=True,
              max_model_len=128, enable_prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    expected = [_peft_greedy(peft_model, tiny_llama_dir, lora.lora_path if lora else None, p)
                for p, lora in zip(prompts, loras)]
    assert len({tuple(e) for e in expected[:3]}) == 3      # the adapters change what is generated
    assert [o.outputs[0].token_ids for o in outs] == expected
    # One adapter for every prompt, given once.
    outs = llm.generate([{"prompt_token_ids": shared}], params, use_tqdm=False, lora_request=poet)
    assert outs[0].outputs[0].token_ids == expected[2]
    assert llm.llm_engine.list_loras() == {1, 2, 3}


def test_lora_needs_enable_lora(tiny_llama_dir, lora_dirs):
    llm = LLM(tiny_llama_dir, skip_tokenizer_init=True, max_model_len=64)
    with pytest.raises(ValueError, match="enable_lora"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False,
                     lora_request=LoRARequest("sql", 1, lora_dirs["sql"]))


def _req(rid: str, lora_id: int) -> Request:
    lora = LoRARequest(f"a{lora_id}", lora_id, "/x") if lora_id else None
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=4), 0, (), lora_request=lora)


def test_scheduler_holds_requests_while_slots_are_busy():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, max_loras=1),
                      KVCacheManager(16, 4))
    a1, b, a2, a1b = _req("a1", 1), _req("base", 0), _req("a2", 2), _req("a1b", 1)
    for r in (a1, a2, b, a1b):
        sched.add_request(r)
    out = sched.schedule()
    assert [r.request_id for r in out.requests] == ["a1", "base", "a1b"]
    assert list(sched.waiting) == [a2]            # waits, in its place, not failed
    sched.update_after_step(out)
    sched.finish(a1, a1.status.FINISHED_LENGTH)
    assert a2 not in sched.schedule().requests    # a1b still holds the slot
    sched.finish(a1b, a1b.status.FINISHED_LENGTH)
    assert a2 in sched.schedule().requests


def test_prefix_cache_keys_include_the_adapter():
    kv = KVCacheManager(16, 2)
    base, lora, lora_again = _req("b", 0), _req("l", 1), _req("l2", 1)
    for r in (base, lora, lora_again):
        kv._update_hashes(r, 2)
    assert base.block_hashes != lora.block_hashes
    assert lora.block_hashes == lora_again.block_hashes


def test_tensor_parallel_adapters_match_peft(tiny_llama_dir, lora_dirs, peft_model):
    """Two ranks (worker processes, gloo): column layers shard B, row layers shard A; greedy as peft's.
    A bad adapter is a ValueError from the ranks, and the engine keeps serving."""
    sql, poet = LoRARequest("sql", 1, lora_dirs["sql"]), LoRARequest("poet", 2, lora_dirs["poet"])
    prompt = [9, 40, 77, 3, 150, 61, 12, 8]
    llm = LLM(tiny_llama_dir, tensor_parallel_size=2, distributed_executor_backend="mp", enable_lora=True,
              max_loras=2, max_lora_rank=8, skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=32)
    try:
        with pytest.raises(ValueError, match="No adapter_config.json"):
            llm.llm_engine.add_lora(LoRARequest("bad", 3, tiny_llama_dir))
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
        outs = llm.generate([prompt] * 3, params, use_tqdm=False, lora_request=[sql, None, poet])
        assert [o.outputs[0].token_ids for o in outs] == [
            _peft_greedy(peft_model, tiny_llama_dir, d, prompt) for d in (lora_dirs["sql"], None, lora_dirs["poet"])]
    finally:
        llm.llm_engine.shutdown()


def test_adapter_over_quantized_layers_matches_peft(tmp_path, lora_dirs):
    """LoRA wraps any linear method: a GPTQ int4 checkpoint plus the adapter equals peft over the dequantized
    weights the checkpoint stands for."""
    from peft import PeftModel

    from tests.quantization.test_quantized_models import write_quantized_llama
    hf = write_quantized_llama(tmp_path / "gptq", "gptq")
    reference = PeftModel.from_pretrained(hf, lora_dirs["sql"]).eval()
    llm = LLM(str(tmp_path / "gptq"), device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
              enable_lora=True, max_lora_rank=8)
    model = llm.llm_engine.executor.runner.model
    assert type(model.model.layers[0].mlp.down_proj.quant_method).__name__ != "UnquantizedLinearMethod"
    prompt = [17, 4, 250, 31, 9, 88, 120]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    out = llm.generate([prompt], params, use_tqdm=False, lora_request=LoRARequest("sql", 1, lora_dirs["sql"]))
    with torch.inference_mode():
        ref = reference.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        with reference.disable_adapter():
            base = reference.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
    assert not torch.equal(ref, base)     # the adapter changes the greedy tokens
    assert out[0].outputs[0].token_ids == ref[0, len(prompt):].tolist()
