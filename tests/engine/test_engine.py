"""The whole engine on a tiny random Llama, compared with Hugging Face transformers and with itself alone."""
import random

import pytest
import torch

from aphrodite import LLM, SamplingParams


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()


def engine(path, **kw):
    kw.setdefault("skip_tokenizer_init", True)
    kw.setdefault("max_model_len", 256)
    kw.setdefault("block_size", 16)
    return LLM(path, device="cpu", dtype="float32", **kw)


def random_prompts(n, lo, hi, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy(max_tokens):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("cpu_path", ["c-kernels", "pytorch-ops", "packed-only", "no-packing"])
def test_greedy_matches_hf_generate(tiny_llama_dir, hf_model, monkeypatch, cpu_path):
    """Every CPU path: C kernels + oneDNN-packed weights (default); no C compiler; packed weights
    with the row-major copies freed (a large model); a PyTorch build without oneDNN."""
    from aphrodite.kernels.cpu import ops, packed_linear
    from aphrodite.modeling import loader
    if cpu_path == "pytorch-ops":
        monkeypatch.setattr(ops, "available", lambda dtype: False)
    elif cpu_path == "packed-only":
        monkeypatch.setattr(loader, "KEEP_ROW_MAJOR_RAM_FRACTION", 0.0)
    elif cpu_path == "no-packing":
        monkeypatch.setattr(packed_linear, "available", lambda dtype=None: False)
    llm = engine(tiny_llama_dir)
    linears = [m for m in llm.llm_engine.executor.runner.model.modules()
               if hasattr(m, "packed_weight") and not hasattr(m, "num_embeddings")]
    if cpu_path == "packed-only":
        assert all(m.weight.numel() == 0 and m.packed_weight is not None for m in linears)
    vocab = hf_model.config.vocab_size
    prompts = random_prompts(4, 5, 40, vocab)
    ours = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(24), use_tqdm=False))
    for p, got in zip(prompts, ours):
        ref = hf_model.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(p):].tolist()


def test_batch_of_32_equals_each_alone(tiny_llama_dir, hf_model):
    vocab = hf_model.config.vocab_size
    prompts = random_prompts(32, 1, 70, vocab, seed=1)
    llm = engine(tiny_llama_dir, max_num_seqs=32)
    batch = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(16), use_tqdm=False))
    alone = [token_ids(llm.generate({"prompt_token_ids": p}, greedy(16), use_tqdm=False))[0] for p in prompts[:8]]
    assert batch[:8] == alone
    # and the rest against a cache-less engine, one at a time
    fresh = engine(tiny_llama_dir, enable_prefix_caching=False)
    for p, got in zip(prompts[8:], batch[8:]):
        assert got == token_ids(fresh.generate({"prompt_token_ids": p}, greedy(16), use_tqdm=False))[0]


def test_prefix_cache_reuses_blocks_and_keeps_tokens(tiny_llama_dir, hf_model):
    vocab = hf_model.config.vocab_size
    prefix = random_prompts(1, 100, 100, vocab, seed=2)[0]
    a, b = prefix + [5, 6, 7], prefix + [9, 10]
    llm = engine(tiny_llama_dir)
    llm.generate({"prompt_token_ids": a}, greedy(8), use_tqdm=False)
    kv = llm.llm_engine.kv_cache
    before = kv.prefix_hits
    out = llm.generate({"prompt_token_ids": b}, greedy(8), use_tqdm=False)[0]
    assert kv.prefix_hits - before == 100 // 16
    assert out.num_cached_tokens == 96
    plain = engine(tiny_llama_dir, enable_prefix_caching=False)
    assert out.outputs[0].token_ids == token_ids(plain.generate({"prompt_token_ids": b}, greedy(8), use_tqdm=False))[0]


def test_small_cache_preempts_and_outputs_stay_the_same(tiny_llama_dir, hf_model):
    vocab = hf_model.config.vocab_size
    prompts = random_prompts(12, 20, 40, vocab, seed=3)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    big = token_ids(engine(tiny_llama_dir).generate(reqs, greedy(40), use_tqdm=False))
    small_llm = engine(tiny_llama_dir, num_gpu_blocks_override=16, max_model_len=128)
    small = token_ids(small_llm.generate(reqs, greedy(40), use_tqdm=False))
    assert small == big
    sched = small_llm.llm_engine.scheduler
    assert small_llm.llm_engine.kv_cache.num_free_blocks == 16
    assert sched.running == [] and not sched.waiting
    assert small_llm.llm_engine.total_preemptions > 0


def test_chunked_prefill_gives_same_tokens(tiny_llama_dir, hf_model):
    vocab = hf_model.config.vocab_size
    prompts = random_prompts(3, 150, 200, vocab, seed=4)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    whole = token_ids(engine(tiny_llama_dir, enable_prefix_caching=False).generate(reqs, greedy(10), use_tqdm=False))
    chunked = token_ids(engine(tiny_llama_dir, max_num_batched_tokens=24, enable_prefix_caching=False)
                        .generate(reqs, greedy(10), use_tqdm=False))
    assert chunked == whole


def test_seeded_sampling_reproducible_and_batch_independent(tiny_llama_dir, hf_model):
    vocab = hf_model.config.vocab_size
    prompts = random_prompts(6, 5, 30, vocab, seed=5)
    llm = engine(tiny_llama_dir)
    sp = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02, max_tokens=20, seed=42, ignore_eos=True)
    alone = token_ids(llm.generate({"prompt_token_ids": prompts[0]}, sp, use_tqdm=False))[0]
    again = token_ids(llm.generate({"prompt_token_ids": prompts[0]}, sp, use_tqdm=False))[0]
    others = [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)] * 5
    mixed = llm.generate([{"prompt_token_ids": p} for p in prompts], [sp] + others, use_tqdm=False)
    assert alone == again == mixed[0].outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, max_tokens=20, seed=7, ignore_eos=True)
    assert token_ids(llm.generate({"prompt_token_ids": prompts[0]}, other_seed, use_tqdm=False))[0] != alone


def test_n_and_best_of(tiny_llama_dir):
    llm = engine(tiny_llama_dir)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(n=3, max_tokens=6, seed=1, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 6 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    best = llm.generate({"prompt_token_ids": [5, 6, 7]},
                        SamplingParams(n=2, best_of=4, max_tokens=6, seed=1, ignore_eos=True, logprobs=0),
                        use_tqdm=False)[0]
    assert len(best.outputs) == 2
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob
    assert llm.llm_engine.kv_cache.num_free_blocks == llm.llm_engine.kv_cache.num_blocks


def test_stop_token_ids_max_and_min_tokens(tiny_llama_dir):
    llm = engine(tiny_llama_dir)
    ref = token_ids(llm.generate({"prompt_token_ids": [3, 4, 5]}, greedy(20), use_tqdm=False))[0]
    stop_at = ref[5]
    first = ref.index(stop_at)
    out = llm.generate({"prompt_token_ids": [3, 4, 5]},
                       SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]), use_tqdm=False)[0]
    o = out.outputs[0]
    assert o.token_ids == ref[:first + 1] and o.finish_reason == "stop" and o.stop_reason == stop_at
    out = llm.generate({"prompt_token_ids": [3, 4, 5]},
                       SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 2, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) > first + 1
    assert out.outputs[0].finish_reason in ("stop", "length")
    o = llm.generate({"prompt_token_ids": [3, 4, 5]}, greedy(7), use_tqdm=False)[0].outputs[0]
    assert len(o.token_ids) == 7 and o.finish_reason == "length"


def test_prompt_logprobs_match_hf(tiny_llama_dir, hf_model):
    prompt = random_prompts(1, 40, 40, hf_model.config.vocab_size, seed=6)[0]
    llm = engine(tiny_llama_dir, max_num_batched_tokens=16)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0), use_tqdm=False)[0]
    ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].double(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos][prompt[pos]]
        assert abs(entry.logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        assert entry.rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1


def test_prompt_logprobs_after_a_prefix_cache_hit(tiny_llama_dir, hf_model):
    prompt = random_prompts(1, 50, 50, hf_model.config.vocab_size, seed=8)[0]
    llm = engine(tiny_llama_dir)
    llm.generate({"prompt_token_ids": prompt}, greedy(2), use_tqdm=False)   # fills the prefix cache
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].double(), -1)
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[pos][prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4


@pytest.mark.parametrize("bad, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(n=0), "n"),
])
def test_bad_sampling_params(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_bad_requests_raise_before_work(tiny_llama_dir):
    llm = engine(tiny_llama_dir, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 64}, greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(logprobs=50), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate({"prompt_token_ids": [5]}, SamplingParams(stop_token_ids=[10**6], min_tokens=2), use_tqdm=False)
    # a bad prompt among good ones fails the whole call before anything runs
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": []}], greedy(4), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert token_ids(llm.generate({"prompt_token_ids": [5, 6]}, greedy(3), use_tqdm=False))[0]


def test_bad_engine_args(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLM(tiny_llama_dir, trust_remote_code=True)
    import json
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM"):
        LLM(str(other), device="cpu", skip_tokenizer_init=True)


def offline_hub(monkeypatch, cache):
    """Point huggingface_hub at an empty (or prepared) cache with the network off."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_unknown_hub_id_offline_names_the_id(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        LLM("no-such-org/no-such-model", device="cpu")


def test_cached_hub_id_resolves_from_the_cache(monkeypatch, tmp_path, tiny_llama_dir):
    """A hub id found in the local HF cache loads without the network."""
    import shutil
    snap = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_llama_dir, snap)
    refs = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    offline_hub(monkeypatch, tmp_path / "hf" / "hub")
    llm = engine("tiny-org/tiny-llama")
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, greedy(4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_garbage_in_unused_cache_slots_does_not_leak(tiny_llama_dir, hf_model):
    """Attention reads whole blocks; slots past a sequence's end hold stale data and must be masked.

    (The pool starts zeroed, and only finite K/V is ever written, so stale data is finite.)"""
    prompts = random_prompts(6, 3, 40, hf_model.config.vocab_size, seed=7)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    clean = token_ids(engine(tiny_llama_dir).generate(reqs, greedy(12), use_tqdm=False))
    llm = engine(tiny_llama_dir)
    for k, v in llm.llm_engine.executor.runner.kv_caches:
        k.fill_(1e4)
        v.fill_(-1e4)
    # Written slots are overwritten before use; only never-written ones keep the poison.
    poisoned = llm.generate(reqs, greedy(12), use_tqdm=False)
    assert token_ids(poisoned) == clean


def test_cpu_kv_cache_is_zeroed_and_page_aligned(tiny_llama_dir):
    """Cache rows must not straddle cache lines (the C attention's vector loads), so the pool is a
    page-aligned mapping; it starts as zeros."""
    llm = engine(tiny_llama_dir)
    for k, v in llm.llm_engine.executor.runner.kv_caches:
        assert k.data_ptr() % 4096 == 0 and v.data_ptr() % 4096 == 0
        assert not k.any() and not v.any()


def test_logprobs_without_tokenizer_have_no_decoded_text(tiny_llama_dir):
    """As in vLLM: skip_tokenizer_init allows logprobs (decoded_token None); stop strings need text."""
    llm = LLM(tiny_llama_dir, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=64)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    assert all(len(d) >= 2 and all(lp.decoded_token is None for lp in d.values()) for d in out.logprobs)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, stop=["x"]), use_tqdm=False)
