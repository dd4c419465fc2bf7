"""Async scheduling (step N+1 queued before step N's tokens are read) gives the same outputs as sync.

The CPU runs the same overlap code as the GPU (the host just does not gain any time), so every
case here compares ``async_scheduling=True`` with the plain synchronous loop token for token.
"""
from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.engine.async_engine import AsyncLLMEngine
from aphrodite.engine.engine import LLMEngine
from aphrodite.engine_args import EngineArgs

VOCAB = 320


def engine(path: str, async_scheduling: bool, **kw) -> LLM:
    kw.setdefault("skip_tokenizer_init", True)
    kw.setdefault("max_model_len", 256)
    return LLM(path, device="cpu", dtype="float32", async_scheduling=async_scheduling, **kw)


def prompts(n: int, lo: int, hi: int, seed: int = 0, prefix: list[int] | None = None) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": (prefix or []) + [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]}
            for _ in range(n)]


def summary(outputs) -> list:
    """Everything a client sees of each request (logprobs rounded: batch shapes differ in float noise)."""
    rows = []
    for out in outputs:
        for o in out.outputs:
            lps = None if o.logprobs is None else [
                {t: (round(lp.logprob, 3), lp.rank) for t, lp in d.items()} for d in o.logprobs]
            rows.append((out.request_id, o.index, o.token_ids, o.text, o.finish_reason, o.stop_reason, lps,
                         out.num_cached_tokens))
    return rows


def both(path: str, reqs, params, **kw) -> tuple[list, list, LLM]:
    """(sync summary, async summary, the async LLM) of one generate call on fresh engines."""
    sync = summary(engine(path, False, **kw).generate(reqs, params, use_tqdm=False))
    llm = engine(path, True, **kw)
    got = summary(llm.generate(reqs, params, use_tqdm=False))
    return sync, got, llm


def assert_drained(llm: LLM) -> None:
    e = llm.llm_engine
    assert e.kv_cache.num_free_blocks == e.kv_cache.num_blocks
    assert not e.scheduler.running and not e.scheduler.waiting and not e.parents and not e.requests


def mixed_params(n: int) -> list[SamplingParams]:
    """Greedy and seeded rows, stop ids, penalties, bias, min_tokens and logprobs, ending at different steps."""
    out = []
    for i in range(n):
        out.append(SamplingParams(
            temperature=0.0 if i % 3 == 0 else 0.9, top_p=0.9 if i % 4 == 1 else 1.0, top_k=20 if i % 5 == 2 else -1,
            seed=100 + i, max_tokens=4 + 5 * i, ignore_eos=i % 2 == 0,
            stop_token_ids=list(range(3, 3 + 12 * (i % 3))), min_tokens=2 if i % 6 == 5 else 0,
            presence_penalty=0.8 if i % 4 == 2 else 0.0, frequency_penalty=0.5 if i % 5 == 3 else 0.0,
            repetition_penalty=1.3 if i % 7 == 4 else 1.0, logit_bias={7: 3.0} if i == 1 else None,
            logprobs=2 if i % 4 == 0 else None, detokenize=False))
    return out


def test_mixed_batch_matches_sync(tiny_llama_dir):
    reqs = prompts(12, 3, 50, seed=1)
    sync, got, llm = both(tiny_llama_dir, reqs, mixed_params(12))
    assert got == sync
    assert {r[4] for r in sync} == {"stop", "length"}   # both ways of finishing occur
    assert_drained(llm)


def test_max_model_len_finishes_without_running_past_it(tiny_llama_dir):
    reqs = prompts(4, 50, 60, seed=2)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, detokenize=False)
    sync, got, llm = both(tiny_llama_dir, reqs, params, max_model_len=64)
    assert got == sync
    assert all(r[4] == "length" and len(r[2]) + len(q["prompt_token_ids"]) == 64 for r, q in zip(got, reqs))
    assert_drained(llm)


def test_preemption_with_a_tiny_cache(tiny_llama_dir):
    reqs = prompts(12, 20, 40, seed=3)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=40, ignore_eos=True,
                             stop_token_ids=list(range(7, 13)) if i % 3 == 1 else None,
                             presence_penalty=0.5 * (i % 3 == 0), detokenize=False) for i in range(12)]
    sync, got, llm = both(tiny_llama_dir, reqs, params, num_gpu_blocks_override=16, max_model_len=128)
    assert got == sync
    assert llm.llm_engine.total_preemptions > 0
    assert_drained(llm)


def test_chunked_prefill_and_prompt_logprobs(tiny_llama_dir):
    reqs = prompts(4, 60, 120, seed=4)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True,
                             prompt_logprobs=1 if i == 0 else None, detokenize=False) for i in range(4)]
    kw = dict(max_num_batched_tokens=24, enable_prefix_caching=False)
    sync = engine(tiny_llama_dir, False, **kw).generate(reqs, params, use_tqdm=False)
    got = engine(tiny_llama_dir, True, **kw).generate(reqs, params, use_tqdm=False)
    assert summary(got) == summary(sync)
    a, b = sync[0].prompt_logprobs, got[0].prompt_logprobs
    assert len(a) == len(b) == len(reqs[0]["prompt_token_ids"])
    assert all(x is None and y is None or x.keys() == y.keys() for x, y in zip(a, b))


def test_prefix_cache_hits(tiny_llama_dir):
    shared = prompts(1, 70, 70, seed=5)[0]["prompt_token_ids"]
    reqs = prompts(6, 1, 20, seed=6, prefix=shared)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, detokenize=False)
    sync_llm, llm = engine(tiny_llama_dir, False), engine(tiny_llama_dir, True)
    for r in reqs:   # one after another, so each later prompt hits the cache
        a = summary(sync_llm.generate(r, params, use_tqdm=False))
        assert summary(llm.generate(r, params, use_tqdm=False)) == a
    # and all at once, where requests admitted together share blocks still being written
    assert summary(llm.generate(reqs, params, use_tqdm=False)) == summary(sync_llm.generate(reqs, params,
                                                                                               use_tqdm=False))
    assert llm.llm_engine.kv_cache.prefix_hits == sync_llm.llm_engine.kv_cache.prefix_hits > 0
    assert_drained(llm)


def test_n_and_best_of(tiny_llama_dir):
    reqs = prompts(3, 5, 20, seed=7)
    params = [SamplingParams(n=3, seed=1, max_tokens=10, stop_token_ids=[5, 6, 7, 8, 9, 10], detokenize=False),
              SamplingParams(n=2, best_of=4, seed=2, max_tokens=8, logprobs=0, detokenize=False),
              SamplingParams(n=2, temperature=0, max_tokens=6, detokenize=False)]
    sync, got, llm = both(tiny_llama_dir, reqs, params)
    assert got == sync
    assert_drained(llm)


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama plus a byte-level BPE tokenizer over its 320 ids, so stop strings can be tested."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny_llama_tok")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(alphabet)})
    letters = [c for c in alphabet if c.isalpha() and c.isascii()]
    pairs = (a + b for a in letters for b in letters)
    while len(vocab) < VOCAB:
        vocab.setdefault(next(pairs), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(Path(path))
    return str(path)


def test_stop_strings_finish_at_the_same_token(tiny_llama_with_tokenizer):
    path = tiny_llama_with_tokenizer
    reqs = ["hello there", "the quick brown fox", "abc", "zzz top"]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = engine(path, False, skip_tokenizer_init=False).generate(reqs, greedy, use_tqdm=False)
    # A stop string from the middle of each reference text: requests stop at different steps.
    params = []
    for i, out in enumerate(ref):
        text = out.outputs[0].text
        k = 4 + 5 * i
        stop = text[k:k + 2] if text[k:k + 2].strip() else "\x00never"
        params.append(SamplingParams(temperature=0 if i % 2 else 0.7, seed=i, max_tokens=30, ignore_eos=True,
                                     stop=[stop], include_stop_str_in_output=i == 1))
    sync, got, llm = both(path, reqs, params, skip_tokenizer_init=False)
    assert got == sync
    assert any(r[4] == "stop" and isinstance(r[5], str) for r in got)
    assert_drained(llm)


def test_streamed_outputs_never_pass_a_stop(tiny_llama_dir):
    """Driving ``step()`` directly: every streamed output is a prefix of the final one, and the finals
    match the sync engine's (the extra token sampled after a stop is dropped)."""
    reqs = prompts(6, 3, 30, seed=8)
    params = mixed_params(6)

    def stream(async_scheduling: bool) -> dict[str, list]:
        args = EngineArgs(model=tiny_llama_dir, device="cpu", dtype="float32", skip_tokenizer_init=True,
                          max_model_len=256, async_scheduling=async_scheduling)
        e = LLMEngine.from_engine_args(args)
        for i, (r, p) in enumerate(zip(reqs, params)):
            e.add_request(str(i), r, p)
        seen: dict[str, list] = {}
        while e.has_unfinished_requests():
            for out in e.step():
                seen.setdefault(out.request_id, []).append((list(out.outputs[0].token_ids), out.finished))
        assert e.kv_cache.num_free_blocks == e.kv_cache.num_blocks
        return seen

    sync, got = stream(False), stream(True)
    assert {k: v[-1] for k, v in got.items()} == {k: v[-1] for k, v in sync.items()}
    for steps in got.values():
        final = steps[-1][0]
        assert [f for _, f in steps].count(True) == 1 and steps[-1][1]
        assert all(final[:len(toks)] == toks for toks, _ in steps)


def test_abort_mid_flight_in_the_async_engine(tiny_llama_dir):
    args = EngineArgs(model=tiny_llama_dir, device="cpu", dtype="float32", skip_tokenizer_init=True,
                      max_model_len=256, async_scheduling=True)
    engine_ = AsyncLLMEngine.from_engine_args(args)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, detokenize=False)
    short = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False)
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}

    async def main() -> tuple[list[int], list[int]]:
        stream = await engine_.add_request("long", prompt, long)
        other = asyncio.create_task(_collect(engine_.generate({"prompt_token_ids": [9, 10]}, short, "short")))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        stream.close()           # aborts "long" while a step of it is queued
        done = await other
        again = await _collect(engine_.generate({"prompt_token_ids": [9, 10]}, short, "short-again"))
        return done, again

    try:
        done, again = asyncio.run(main())
    finally:
        engine_.shutdown()
    ref = engine(tiny_llama_dir, False).generate({"prompt_token_ids": [9, 10]}, short, use_tqdm=False)
    assert done == again == ref[0].outputs[0].token_ids
    e = engine_.engine
    assert e.kv_cache.num_free_blocks == e.kv_cache.num_blocks and not e.parents


async def _collect(gen) -> list[int]:
    last = None
    async for out in gen:
        last = out
    assert last is not None and last.finished
    return list(last.outputs[0].token_ids)


def test_engine_argument_default_and_flag():
    import argparse
    assert EngineArgs().async_scheduling is None     # auto: resolved by device (next test)
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert parser.parse_args(["--async-scheduling"]).async_scheduling is True
    assert parser.parse_args(["--no-async-scheduling"]).async_scheduling is False
    assert "async_scheduling" not in vars(parser.parse_args([]))


def test_auto_is_off_on_the_cpu(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=64)
    assert llm.llm_engine.config.async_scheduling is False
    assert engine(tiny_llama_dir, True, max_model_len=64).llm_engine.config.async_scheduling is True
