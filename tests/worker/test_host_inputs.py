"""The host side of a step at scale: the worker's vectorized batch building (persistent block tables,
``_prepare``) against a per-request reference built from the test's own bookkeeping, the vectorized
sampling uniforms against the scalar splitmix64, and the scheduler's batch finish against one at a time."""
import random

import numpy as np
import pytest
import torch

from aphrodite import LLM, SamplingParams
from aphrodite.config import SchedulerConfig
from aphrodite.engine.kv_cache import KVCacheManager
from aphrodite.engine.request import Request, RequestStatus
from aphrodite.engine.scheduler import Scheduler
from aphrodite.modeling.layers.samplers.metadata import uniform_from_seed
from aphrodite.worker.sampling_inputs import uniforms_from_seeds
from aphrodite.worker.step_plan import NewRequestData, StepPlan, apply_plan

BS = 4


class _Ref:
    """The test's own record of one request, as the engine would hold it."""

    def __init__(self, rid: str, prompt: list[int]) -> None:
        self.rid, self.tokens, self.computed, self.pending = rid, list(prompt), 0, 0
        self.blocks: list[int] = []
        self.sent_tokens, self.sent_blocks, self.sent = len(prompt), 0, False


def _reference(refs: list[_Ref], counts: list[int], prev_rows: dict[str, int]):
    """ids (None: taken from the previous step), positions, slots, starts, seq lens, tables, sample rows."""
    ids, pos, slots, starts, seq_lens = [], [], [], [0], []
    width = max(len(r.blocks) for r in refs)
    tables = np.zeros((len(refs), width), dtype=np.int32)
    gather = []
    for i, (r, n) in enumerate(zip(refs, counts)):
        for p in range(r.computed, r.computed + n):
            if p < len(r.tokens):
                ids.append(r.tokens[p])
            else:
                ids.append(0)
                gather.append((len(ids) - 1, prev_rows[r.rid], i))
            pos.append(p)
            slots.append(r.blocks[p // BS] * BS + p % BS)
        starts.append(starts[-1] + n)
        seq_lens.append(r.computed + n)
        tables[i, :len(r.blocks)] = r.blocks
    samples = [i for i, (r, n) in enumerate(zip(refs, counts)) if r.computed + n == len(r.tokens) + r.pending]
    return ids, pos, slots, starts, seq_lens, tables, gather, samples


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
               block_size=BS)


@pytest.fixture
def runner(llm):
    return llm.llm_engine.executor.runner


def test_prepare_matches_a_per_request_reference(runner):
    """Random steps with new requests, prefill chunks, known and in-flight decodes, preemptions (tables
    dropped and rebuilt), finished requests (rows reused) and table growth past the initial width."""
    rng = random.Random(0)
    free_blocks = list(range(1, 4000))
    rng.shuffle(free_blocks)
    live: dict[str, _Ref] = {}
    prev_rows: dict[str, int] = {}
    next_id = 0
    for step in range(60):
        finished = [rid for rid in list(live) if live[rid].sent and rng.random() < 0.08]
        for rid in finished:
            free_blocks.extend(live.pop(rid).blocks)
        for _ in range(rng.randint(0, 4)):
            live[f"r{next_id}"] = _Ref(f"r{next_id}", [rng.randrange(3, 300) for _ in range(rng.randint(1, 90))])
            next_id += 1
        chosen: list[tuple[_Ref, int]] = []
        for r in live.values():
            while r.pending > 1 or (r.pending and (r.rid not in prev_rows or rng.random() < 0.5)):
                r.tokens.append(rng.randrange(3, 300))      # the host learned a sampled token
                r.pending -= 1
            if rng.random() < 0.2:
                continue
            if not r.pending and r.computed and rng.random() < 0.05:    # preempted: recompute from scratch
                free_blocks.extend(r.blocks)
                r.blocks, r.computed, r.sent_blocks = [], 0, 0
            left = len(r.tokens) + r.pending - r.computed
            n = 1 if r.pending else rng.randint(1, left)
            while len(r.blocks) * BS < r.computed + n:
                r.blocks.append(free_blocks.pop())
            chosen.append((r, n))
        if not chosen:
            continue
        chosen.sort(key=lambda rn: rn[1] != 1)
        refs, counts = [r for r, _ in chosen], [n for _, n in chosen]
        plan = StepPlan(step_id=step, finished_ids=finished, num_scheduled=counts)
        for r in refs:
            if not r.sent:
                plan.new_requests.append(NewRequestData(r.rid, r.tokens[:r.sent_tokens], SamplingParams(), 1, (2,)))
                r.sent = True
            plan.req_ids.append(r.rid)
            plan.num_computed.append(r.computed)
            plan.num_pending.append(r.pending)
            plan.num_kept_blocks.append(r.sent_blocks)
            plan.num_new_blocks.append(len(r.blocks) - r.sent_blocks)
            plan.new_block_ids.extend(r.blocks[r.sent_blocks:])
            r.sent_blocks = len(r.blocks)
            plan.num_new_tokens.append(len(r.tokens) - r.sent_tokens)
            plan.new_token_ids.extend(r.tokens[r.sent_tokens:])
            r.sent_tokens = len(r.tokens)
        runner._prev_rows = dict(prev_rows)
        runner._prev_tokens = torch.arange(100, 100 + max(len(prev_rows), 1))
        reqs = apply_plan(runner.requests, plan, runner.block_tables)
        host = runner._prepare(reqs, plan)
        ids, pos, slots, starts, seq_lens, tables, gather, samples = _reference(refs, counts, prev_rows)
        assert host.ids.tolist() == ids and host.positions.tolist() == pos and host.slots.tolist() == slots
        assert host.starts == starts and host.seq_lens == seq_lens
        assert host.starts_np.tolist() == starts and host.seq_lens_np.tolist() == seq_lens
        np.testing.assert_array_equal(host.block_tables, tables)
        assert host.num_decodes == counts.count(1) and host.max_query_len == max(counts)
        assert np.flatnonzero(host.samples).tolist() == samples
        if gather:
            assert host.from_prev.dst.tolist() == [g[0] for g in gather]
            assert host.from_prev.src.tolist() == [g[1] for g in gather]
            assert host.from_prev.req_rows.tolist() == [g[2] for g in gather]
        else:
            assert host.from_prev is None
        for r, n in chosen:     # the step ran: computed tokens advance, a sample is pending
            r.computed += n
            if r.computed == len(r.tokens) + r.pending:
                r.pending += 1
        prev_rows = {refs[i].rid: j for j, i in enumerate(samples)}
    assert set(runner.requests) == set(live)
    runner.requests.clear()


def test_a_token_the_last_step_did_not_sample_is_an_error(runner):
    plan = StepPlan(step_id=1, new_requests=[NewRequestData("x", [5, 6], SamplingParams(), 1, (2,))], req_ids=["x"],
                    num_scheduled=[1], num_computed=[2], num_pending=[1], num_kept_blocks=[0], num_new_blocks=[1],
                    new_block_ids=[3], num_new_tokens=[0])
    runner._prev_rows = {}
    reqs = apply_plan(runner.requests, plan, runner.block_tables)
    with pytest.raises(RuntimeError, match="did not sample"):
        runner._prepare(reqs, plan)
    runner.requests.clear()


def test_vectorized_uniforms_equal_the_scalar_ones_bit_for_bit():
    rng = random.Random(1)
    seeds = [rng.getrandbits(63) for _ in range(500)] + [0, 1, -1, -(1 << 70), (1 << 64) + 5, (1 << 200) + 3]
    counters = [rng.randrange(0, 1 << 20) for _ in seeds]
    got = uniforms_from_seeds(seeds, counters)
    want = [uniform_from_seed(s, c) for s, c in zip(seeds, counters)]
    assert got.dtype == np.float64 and got.tolist() == want


def _scheduler_with(n: int) -> tuple[Scheduler, list[Request]]:
    kv = KVCacheManager(4 * n + 8, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=10_000, max_model_len=256), kv)
    reqs = [Request(f"q{i}", [3 + i % 7] * (5 + i % 9), SamplingParams(), i, (2,)) for i in range(n)]
    for r in reqs:
        sched.add_request(r)
    sched.schedule()
    return sched, reqs


def test_finish_many_equals_finishing_one_at_a_time():
    """Same queues, statuses and free-block order (which decides later block ids) as ``finish`` in a loop,
    with requests ending from the running list, the waiting queue and neither (never scheduled)."""
    a, ra = _scheduler_with(20)
    b, rb = _scheduler_with(20)
    for s in (a, b):
        s._preempt(s.running.pop())         # q19 back to waiting
        s.add_request(Request("late", [4, 5], SamplingParams(), 0, (2,)))
    late_a, late_b = a.waiting[-1], b.waiting[-1]
    pick = [1, 4, 5, 9, 13, 17, 19, 0]
    statuses = [RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_ABORTED] * 3
    for i, st in zip(pick, statuses):
        a.finish(ra[i], st)
    a.finish(late_a, RequestStatus.FINISHED_ABORTED)
    b.finish_many([(rb[i], st) for i, st in zip(pick, statuses)] + [(late_b, RequestStatus.FINISHED_ABORTED)])
    assert [r.request_id for r in a.running] == [r.request_id for r in b.running]
    assert [r.request_id for r in a.waiting] == [r.request_id for r in b.waiting]
    assert [r.status for r in ra] == [r.status for r in rb]
    assert list(a.kv_cache.free_blocks) == list(b.kv_cache.free_blocks)



def test_parameters_changed_in_place_between_calls_take_effect(llm):
    """The worker keeps each parameters object's sampling rows while its requests run; a caller that edits
    the object before the next ``generate`` must get the new behaviour, as with a fresh object."""
    prompts = [{"prompt_token_ids": [5 + i, 17, 42, 7 * i + 3]} for i in range(6)]
    p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    p.temperature, p.top_k, p.seed = 1.0, 5, 3
    edited = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    fresh = SamplingParams(temperature=1.0, top_k=5, seed=3, max_tokens=8, ignore_eos=True)
    assert edited == [o.outputs[0].token_ids for o in llm.generate(prompts, fresh, use_tqdm=False)]
    assert edited != greedy
