"""Tensor and pipeline parallelism through real executors (CPU, gloo): same outputs as one rank.

Every engine here runs the same workload as an in-process single-rank engine with the same
scheduler settings: requests sharing a prefix (prefix caching), more requests than
``max_num_seqs`` (continuous batching), a KV cache too small for all of them (preemption by
recompute), chunked prefill, prompt logprobs and seeded sampling with n=2. Greedy and seeded
tokens must be identical and log-probabilities (softmaxes of the logits) equal within fp32
tolerance.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.executor.base import ExecutorDeadError

VOCAB = 320
ENGINE = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=48, num_gpu_blocks_override=12, block_size=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_workers():
    """Worker processes inherit this: two ranks on a small CPU must not fight over its cores."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if saved is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved


def workload() -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(0)
    prefix = [rng.randrange(3, VOCAB) for _ in range(34)]     # two full blocks shared by most prompts
    prompts, params = [], []
    for i in range(9):
        head = prefix if i % 3 else []
        prompts.append({"prompt_token_ids": head + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))]})
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(6, 24), ignore_eos=True, logprobs=2,
                                     prompt_logprobs=2 if i == 4 else None, detokenize=False))
    prompts.append({"prompt_token_ids": prefix + [5, 6, 7]})
    params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=11, n=2, max_tokens=12, ignore_eos=True,
                                 detokenize=False))
    return prompts, params


def generate(llm: LLM) -> list:
    prompts, params = workload()
    return llm.generate(prompts, params, use_tqdm=False)


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs], g.request_id
        for go, wo in zip(g.outputs, w.outputs):
            if wo.logprobs is not None:
                for gd, wd in zip(go.logprobs, wo.logprobs):
                    assert gd.keys() == wd.keys()
                    for t in wd:
                        assert gd[t].logprob == pytest.approx(wd[t].logprob, abs=1e-4)
        if w.prompt_logprobs is not None:
            for gd, wd in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
                for t in wd:
                    assert gd[t].logprob == pytest.approx(wd[t].logprob, abs=1e-4)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: str) -> tuple[list, int, int]:
    """(outputs, preemptions, prefix-cache hits) of one in-process rank."""
    llm = LLM(tiny_llama_dir, **ENGINE)
    out = generate(llm)
    return out, llm.llm_engine.total_preemptions, llm.llm_engine.kv_cache.prefix_hits


def _check_against(llm: LLM, reference, same_schedule: bool = True) -> None:
    """Same outputs as one rank. Without pipelining the schedule is the same step for step; with
    micro-batches in flight it differs, but still preempts and hits the prefix cache."""
    want, preemptions, hits = reference
    assert preemptions > 0 and hits > 0      # the workload does exercise both
    assert_same(generate(llm), want)
    if same_schedule:
        assert llm.llm_engine.total_preemptions == preemptions
        assert llm.llm_engine.kv_cache.prefix_hits == hits
    else:
        assert llm.llm_engine.total_preemptions > 0 and llm.llm_engine.kv_cache.prefix_hits > 0
    e = llm.llm_engine
    assert e.kv_cache.num_free_blocks == e.kv_cache.num_blocks and not e.parents


@pytest.fixture(scope="module")
def tp2(tiny_llama_dir: str):
    llm = LLM(tiny_llama_dir, tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    yield llm
    llm.llm_engine.shutdown()


def test_tp2_mp_matches_one_rank(tp2: LLM, reference) -> None:
    """Two processes, one shard each; async scheduling on, so every rank gathers its inputs from its
    own copy of the sampled ids."""
    assert tp2.llm_engine.executor.__class__.__name__ == "MultiprocExecutor"
    _check_against(tp2, reference)


def test_tp2_overlapped_halves_match_one_rank(tp2: LLM, reference) -> None:
    """Steps split into two halves whose all-reduces are issued asynchronously and interleaved on two
    threads (``communication.run_overlapped``) give one rank's outputs; both ranks split the same steps."""
    assert tp2.collective_rpc("tp_overlap") == [(0, 0), (0, 0)]   # off on the CPU by default
    tp2.collective_rpc("tp_overlap", 8)
    try:
        assert_same(generate(tp2), reference[0])
        (_, a), (_, b) = tp2.collective_rpc("tp_overlap")
        assert a == b >= 4
    finally:
        tp2.collective_rpc("tp_overlap", 0)


def test_profile_reports_every_rank(tp2: LLM) -> None:
    """``start_profile``/``stop_profile`` run torch.profiler on both worker processes; each rank's summary
    counts the ops its shard ran (the all-reduce included) and cannot be started twice."""
    tp2.start_profile()
    generate(tp2)
    summaries = tp2.stop_profile()
    assert [s.rank for s in summaries] == [0, 1]
    for s in summaries:
        assert s.wall_s > 0 and 0 < s.kernel_s and s.kernels > 100 and "aten::" in s.table
    # Both ranks run the same forward on their shards (and the same sampler): about the same op count.
    assert 0.8 < summaries[0].kernels / summaries[1].kernels < 1.25
    with pytest.raises(RuntimeError, match="not running"):   # a failed call leaves the ranks serving
        tp2.collective_rpc("stop_profile")
    assert all(p.is_alive() for p in tp2.llm_engine.executor.procs)


def test_start_up_timeline_of_every_rank(tp2: LLM) -> None:
    """Each rank stamps its start-up phases on the shared wall clock, in the order they ran."""
    timelines = tp2.collective_rpc("startup_timeline")
    assert len(timelines) == 2
    for tl in timelines:
        names = [name for name, _ in tl]
        # Prestarted by LLMEngine.from_engine_args: imports and the groups come before the configuration.
        assert names == ["worker process running (spawned)", "imported torch, the worker and Transformers",
                         "joined the parallel groups (before the configuration came)", "received the configuration",
                         "loaded the model", "allocated the KV cache"]
        times = [at for _, at in tl]
        assert times == sorted(times) and time.time() - 600 < times[0] <= times[-1] <= time.time()


def test_tp2_x_pp2_matches_one_rank_and_a_killed_worker_fails_generate(tiny_llama_dir: str, reference) -> None:
    """Two pipeline stages of two ranks each, micro-batches in flight; then a rank is killed."""
    llm = LLM(tiny_llama_dir, pipeline_parallel_size=2, tensor_parallel_size=2, **ENGINE)
    try:
        assert llm.llm_engine._depth == 2
        _check_against(llm, reference, same_schedule=False)
        executor = llm.llm_engine.executor
        os.kill(executor.procs[2].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ExecutorDeadError, match="rank 2 .*died with exit code -9"):
            generate(llm)
        assert time.monotonic() - start < 10
        for p in executor.procs:
            p.join(5)
            assert not p.is_alive()
    finally:
        llm.llm_engine.shutdown()


def test_hung_worker_fails_generate_quickly(tp2: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped (frozen) rank is noticed by its missing heartbeat; generate raises, every rank goes."""
    monkeypatch.setenv("APHRODITE_WORKER_HANG_TIMEOUT_S", "2")
    executor = tp2.llm_engine.executor
    victim = executor.procs[1]
    os.kill(victim.pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(ExecutorDeadError, match="rank 1 .*unresponsive"):
        tp2.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < 15
    for p in executor.procs:
        p.join(5)
        assert not p.is_alive()
    with pytest.raises(ExecutorDeadError):     # the engine stays failed, it does not hang
        tp2.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4), use_tqdm=False)
