"""Structured output under async scheduling: the step after a constrained token is sent before that token is
known, and its sampler waits for the grammar bitmask (``StepPlan.grammar_pending`` + ``GrammarBitmask``).

The reference is the same engine run plainly (one step at a time, each mask filled before its step is
sent): greedy and seeded outputs must be identical, token for token, and a request whose grammar is
complete must stop at exactly that token although the next step already sampled one for it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.sampling_params import StructuredOutputsParams as SO

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]
GRAMMAR = 'root ::= "The answer is " ("yes" | "no") "."'
KINDS = [("json", PERSON), ("regex", PHONE), ("choice", CHOICES), ("grammar", GRAMMAR), ("free", None),
         ("json_object", True)]


def mixed_params(max_tokens: int, greedy: bool) -> list[SamplingParams]:
    """One request per kind, twice: greedy, or seeded sampling with a few samplers on."""
    params = []
    for i, (kind, value) in enumerate(KINDS * 2):
        so = None if kind == "free" else SO(**{kind: value}, **({"disable_any_whitespace": True}
                                                                 if kind.startswith("json") else {}))
        sampling = dict(temperature=0.0) if greedy else dict(temperature=0.9, seed=100 + i, min_p=0.02 * (i % 2))
        # Without detokenizing a request takes the engine's short path for plain token results.
        params.append(SamplingParams(max_tokens=max_tokens, structured_outputs=so, detokenize=i % 3 != 0,
                                     **sampling))
    return params


def token_lists(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


class _Spy:
    """Counts the steps sent with a pending grammar bitmask and the bitmasks sent after them."""

    def __init__(self, executor) -> None:
        self.pending = self.masks = 0
        self._execute_async, self._sample_async = executor.execute_async, executor.sample_async
        executor.execute_async, executor.sample_async = self.execute_async, self.sample_async

    def execute_async(self, plan):
        self.pending += plan.grammar_pending
        return self._execute_async(plan)

    def sample_async(self, mask):
        self.masks += 1
        return self._sample_async(mask)


def run_both(llm: LLM, prompts, params) -> tuple[list, list, _Spy]:
    """The outputs with plain scheduling, then with async scheduling (the same engine, its depth switched)."""
    engine = llm.llm_engine
    plain = llm.generate(prompts, params, use_tqdm=False)
    spy = _Spy(engine.executor)
    engine._depth = 2
    try:
        overlapped = llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine._depth = 1
        del engine.executor.execute_async, engine.executor.sample_async
    return plain, overlapped, spy


def _json_documents(n: int) -> list[str]:
    rng = random.Random(0)
    words = "name age yes no the answer is positive negative neutral phone call".split()
    return [json.dumps({"name": rng.choice(words), "age": rng.randint(0, 120), "ok": rng.random() < 0.5,
                        "tags": rng.choices(words, k=3)}) + f" ({rng.randint(100, 999)}) {rng.randint(100, 999)}-"
            f"{rng.randint(1000, 9999)} The answer is {rng.choice(['yes', 'no'])}." for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_model_with_tokenizer(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama (vocabulary 320) with a byte-level BPE of 320 tokens trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = tmp_path_factory.mktemp("tiny_llama_tok")
    for f in Path(tiny_llama_dir).iterdir():
        shutil.copy(f, path / f.name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_json_documents(300), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return str(path)


ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=8, block_size=16)


@pytest.fixture(scope="module")
def llm(tiny_model_with_tokenizer: str):
    llm = LLM(tiny_model_with_tokenizer, **ENGINE)
    yield llm
    llm.llm_engine.shutdown()


PROMPTS = ["A JSON person:", "My phone number is", "The review was great. Sentiment:", "Is water wet?",
           "Once upon a time", "Say something in JSON."] * 2


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_async_matches_plain_scheduling(llm: LLM, greedy: bool) -> None:
    params = mixed_params(24, greedy)
    plain, overlapped, spy = run_both(llm, PROMPTS, params)
    assert token_lists(overlapped) == token_lists(plain)
    assert [o.outputs[0].finish_reason for o in overlapped] == [o.outputs[0].finish_reason for o in plain]
    # The overlapped path really ran: decode steps were sent before their masks, and each got one.
    assert spy.pending > 10 and spy.masks == spy.pending
    engine = llm.llm_engine
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks and not engine.parents


def test_complete_grammar_stops_at_its_last_token(llm: LLM) -> None:
    """ignore_eos: only the grammar ends these requests. The step after the completing token is already
    sampling for them; that token must not be emitted."""
    import xgrammar as xgr
    so = [SO(choice=CHOICES), SO(grammar=GRAMMAR), SO(regex=PHONE)]
    params = [SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, structured_outputs=s,
                             detokenize=k == 0) for k, s in enumerate(so)]
    prompts = ["Sentiment of 'great':", "Is water wet?", "Call me at"]
    plain, overlapped, _ = run_both(llm, prompts, params)
    assert token_lists(overlapped) == token_lists(plain)
    manager = llm.llm_engine.structured_output
    for s, out in zip(so, overlapped):
        o = out.outputs[0]
        assert o.finish_reason == "stop" and len(o.token_ids) < 60
        # An independent matcher accepts every token and is complete only after the last one.
        m = xgr.GrammarMatcher(manager.compile(s))
        for t in o.token_ids[:-1]:
            assert m.accept_token(t) and not m.is_terminated()
        assert m.accept_token(o.token_ids[-1]) and m.is_terminated()


def test_abort_of_a_constrained_request_mid_flight(llm: LLM) -> None:
    """An abort between steps (a step queued for the request, its mask sent) leaves the others exact."""
    engine = llm.llm_engine
    params = mixed_params(16, greedy=True)[:4]
    want = token_lists(llm.generate(PROMPTS[:4], params, use_tqdm=False))
    engine._depth = 2
    try:
        for i, (p, sp) in enumerate(zip(PROMPTS[:4], params)):
            engine.add_request(str(i), p, sp)
        done, steps = {}, 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = list(o.outputs[0].token_ids)
            steps += 1
            if steps == 4:
                engine.abort_request("1")
    finally:
        engine._depth = 1
    assert "1" not in done
    assert [done[str(i)] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_preemption_mid_flight_matches_plain(tiny_model_with_tokenizer: str) -> None:
    """A KV cache too small for the batch: constrained requests are preempted (recomputed) while a step that
    samples for them is in flight; their grammars keep every accepted token, so the outputs stay exact."""
    small = dict(ENGINE, num_gpu_blocks_override=8, max_num_batched_tokens=64)
    params = mixed_params(28, greedy=False)
    outs, preemptions = [], []
    for async_scheduling in (False, True):
        llm = LLM(tiny_model_with_tokenizer, async_scheduling=async_scheduling, **small)
        try:
            outs.append(token_lists(llm.generate(PROMPTS, params, use_tqdm=False)))
            preemptions.append(llm.llm_engine.total_preemptions)
        finally:
            llm.llm_engine.shutdown()
    assert preemptions[0] > 0 and preemptions[1] > 0
    assert outs[1] == outs[0]


def test_tp2_mp_async_matches_one_rank(llm: LLM, tiny_model_with_tokenizer: str) -> None:
    """Every rank samples (each needs the sampled ids for the next step's inputs), so every rank gets the
    bitmask message and applies it: the same tokens as one plain in-process rank."""
    params = mixed_params(20, greedy=False) + mixed_params(20, greedy=True)[:6]
    prompts = [p.split(":")[0] for p in PROMPTS] + PROMPTS[:6]
    want = llm.generate(prompts, params, use_tqdm=False)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        tp2 = LLM(tiny_model_with_tokenizer, tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    try:
        assert tp2.llm_engine.executor.__class__.__name__ == "MultiprocExecutor"
        spy = _Spy(tp2.llm_engine.executor)
        got = tp2.generate(prompts, params, use_tqdm=False)
    finally:
        tp2.llm_engine.shutdown()
    assert token_lists(got) == token_lists(want)
    assert spy.pending > 10 and spy.masks == spy.pending
    # Bounded grammars finish even on a random model.
    assert sum(o.outputs[0].finish_reason == "stop" for o in got) >= 6


def test_accept_many_in_parallel_matches_one_by_one(llm: LLM) -> None:
    """A large batch's tokens are accepted in chunks on threads: same matcher states as accepting them one by
    one (allowed tokens advance, a rejected one marks its state failed)."""
    import numpy as np
    manager = llm.llm_engine.structured_output
    compiled = manager.compile(SO(regex=PHONE))
    n = 96
    parallel = [manager.matcher(compiled) for _ in range(n)]
    serial = [manager.matcher(compiled) for _ in range(n)]
    rng = random.Random(0)
    for step in range(6):
        mask = manager.new_bitmask(n)
        manager.fill_many(mask, list(range(n)), serial)
        tokens = []
        for i in range(n):
            bits = np.unpackbits(mask[i].view(np.uint8), bitorder="little")[:manager.vocab_size]
            pool = np.flatnonzero(bits if i % 17 != step else 1 - bits)   # a few rejected tokens
            tokens.append(int(pool[rng.randrange(len(pool))]))
        live = [i for i in range(n) if not serial[i].failed]
        manager.accept_many([parallel[i] for i in live], [tokens[i] for i in live])
        for i in live:
            serial[i].accept(tokens[i])
    assert sum(s.failed for s in serial) >= 5
    assert [s.failed for s in parallel] == [s.failed for s in serial]
    assert [s.num_accepted for s in parallel] == [s.num_accepted for s in serial]
    live = [i for i in range(n) if not serial[i].failed and not serial[i].terminated]
    a, b = manager.new_bitmask(n), manager.new_bitmask(n)
    manager.fill_many(a, live, [parallel[i] for i in live])
    manager.fill_many(b, live, [serial[i] for i in live])
    assert np.array_equal(a, b)
    # The reused step buffers (two, alternating): rows not filled this time are all ones again, whatever an
    # earlier step left there.
    for _ in range(2):
        manager.batch_bitmask(n, list(range(n)), [manager.matcher(compiled) for _ in range(n)])
    assert np.array_equal(manager.batch_bitmask(n, live, [parallel[i] for i in live]), a)
