"""Cost of sending one step to every worker: the shared-memory ring vs. a pipe per rank.

Readers are separate processes that only unpickle the plan (no model), so what is measured
is the broadcast itself: the writer's cost per step (pickle once + one copy into shared
memory) and the time until every reader has the step decoded. The baseline pickles the plan
and sends it through one pipe per rank, as a naive executor would.

    python benchmarks/cpu/step_broadcast.py [--readers 2] [--steps 2000]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import time

from aphrodite.executor.shm_broadcast import ShmBroadcast
from aphrodite.sampling_params import SamplingParams
from aphrodite.worker.step_plan import NewRequestData, StepPlan


def decode_plan(batch: int, step: int) -> StepPlan:
    """A steady-state decode step: one token per request, a new block every 16 steps (distinct values, as in
    a real batch: requests of different lengths, ids from a 32k vocabulary)."""
    ids = [f"cmpl-{i:08x}-0" for i in range(batch)]
    return StepPlan(step_id=step, req_ids=ids, num_scheduled=[1] * batch,
                    num_computed=[300 + 7 * i + step for i in range(batch)], num_pending=[1] * batch,
                    num_kept_blocks=[(300 + 7 * i + step) // 16 for i in range(batch)],
                    num_new_blocks=[1 if step % 16 == 0 else 0] * batch,
                    new_block_ids=list(range(1000, 1000 + batch)) if step % 16 == 0 else [],
                    num_new_tokens=[1] * batch, new_token_ids=[(i * 7919 + step) % 32000 for i in range(batch)])


def prefill_plan(batch: int, prompt_len: int) -> StepPlan:
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=128)
    news = [NewRequestData(f"new-{i}", list(range(prompt_len)), params, 1234 + i, (2,)) for i in range(batch)]
    return StepPlan(step_id=1, new_requests=news, req_ids=[n.request_id for n in news],
                    num_scheduled=[prompt_len] * batch, num_computed=[0] * batch, num_pending=[0] * batch,
                    num_kept_blocks=[0] * batch, num_new_blocks=[prompt_len // 16] * batch,
                    new_block_ids=list(range(batch * prompt_len // 16)), num_new_tokens=[0] * batch)


def shm_reader(handle, rank: int, spin_s: float) -> None:
    mq = ShmBroadcast.attach(handle, rank, spin_s=spin_s)
    while mq.dequeue() is not None:
        pass


def pipe_reader(conn, done) -> None:
    while True:
        obj = pickle.loads(conn.recv_bytes())
        done.send_bytes(b"1")
        if obj is None:
            return


def bench_shm(readers: int, plans: list[StepPlan], spin_s: float) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    mq = ShmBroadcast.create(readers, ctx)
    procs = [ctx.Process(target=shm_reader, args=(mq.handle, r, spin_s)) for r in range(readers)]
    for p in procs:
        p.start()
    write, total = [], []
    for plan in plans:
        target = mq._seq + 1
        t0 = time.perf_counter()
        mq.enqueue(plan)
        t1 = time.perf_counter()
        while int(mq._readers[:, 0].min()) < target:
            os.sched_yield()
        t2 = time.perf_counter()
        write.append(t1 - t0)
        total.append(t2 - t0)
    mq.enqueue(None)
    for p in procs:
        p.join()
    mq.close()
    return statistics.median(write) * 1e6, statistics.median(total) * 1e6


def bench_pipes(readers: int, plans: list[StepPlan]) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    pairs = [ctx.Pipe() for _ in range(readers)]
    acks = [ctx.Pipe() for _ in range(readers)]
    procs = [ctx.Process(target=pipe_reader, args=(pairs[r][1], acks[r][1])) for r in range(readers)]
    for p in procs:
        p.start()
    write, total = [], []
    for plan in plans:
        t0 = time.perf_counter()
        for a, _ in pairs:
            a.send_bytes(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))
        t1 = time.perf_counter()
        for a, _ in acks:
            a.recv_bytes()
        t2 = time.perf_counter()
        write.append(t1 - t0)
        total.append(t2 - t0)
    for a, _ in pairs:
        a.send_bytes(pickle.dumps(None))
    for p in procs:
        p.join()
    return statistics.median(write) * 1e6, statistics.median(total) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--spin", type=float, default=1e-4, help="readers' spin before sleeping (s); the CPU "
                    "executor uses 1e-4, the GPU one 0.05")
    args = ap.parse_args()
    cases = [("decode, batch 1", [decode_plan(1, s) for s in range(args.steps)]),
             ("decode, batch 64", [decode_plan(64, s) for s in range(args.steps)]),
             ("decode, batch 256", [decode_plan(256, s) for s in range(args.steps)]),
             ("decode, batch 1000", [decode_plan(1000, s) for s in range(args.steps // 4)]),
             ("prefill, 8 new x 1024 tokens", [prefill_plan(8, 1024)] * max(1, args.steps // 10))]
    rows = []
    for name, plans in cases:
        size = len(pickle.dumps(plans[-1], protocol=pickle.HIGHEST_PROTOCOL))
        shm_w, shm_t = bench_shm(args.readers, plans, args.spin)
        pipe_w, pipe_t = bench_pipes(args.readers, plans)
        rows.append((name, size, shm_w, shm_t, pipe_w, pipe_t))
    print(f"\nStep broadcast to {args.readers} reader processes, reader spin {args.spin:g} s (median us per step)")
    print(f"{'plan':<30}{'bytes':>9}{'shm write':>11}{'shm all read':>14}{'pipes write':>13}{'pipes all read':>16}")
    for name, size, a, b, c, d in rows:
        print(f"{name:<30}{size:>9}{a:>11.1f}{b:>14.1f}{c:>13.1f}{d:>16.1f}")


if __name__ == "__main__":
    main()
