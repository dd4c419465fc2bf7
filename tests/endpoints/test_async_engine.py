"""``AsyncLLMEngine`` around a scripted stand-in engine: no model, so failures can be staged at will.

Covers what a real model cannot easily show: a step that raises (the requests in flight fail, the
loop keeps serving), the error event inside an SSE stream, aborts on early exit, an idle loop that
does not spin, and shutdown.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from aphrodite.engine.async_engine import AsyncLLMEngine, EngineDeadError
from aphrodite.outputs import CompletionOutput, RequestOutput
from aphrodite.sampling_params import SamplingParams

POISON = 666  # a prompt holding this token id makes the step after its second token raise


class ScriptedEngine:
    """Just enough of ``LLMEngine``: one token ("x") per request per step, 8 KV blocks."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(
            scheduler=SimpleNamespace(max_model_len=64, max_num_seqs=8),
            model=SimpleNamespace(model="scripted", path="/nowhere", max_logprobs=5),
            cache=SimpleNamespace(num_blocks=8, block_size=16))
        self.tokenizer = None
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.kv_cache = SimpleNamespace(num_blocks=8, num_free_blocks=8, usage=0.0)
        self.num_prompt_tokens = self.num_generated_tokens = self.total_preemptions = 0
        self.requests: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.thread_ids: set[int] = set()

    def _touch(self) -> None:
        self.thread_ids.add(threading.get_ident())

    def add_request(self, request_id, prompt, params, arrival_time=None) -> None:
        self._touch()
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        if not ids:
            raise ValueError("The prompt is empty.")
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        self.requests[request_id] = (list(ids), params, [])
        self.kv_cache.num_free_blocks -= 1

    def abort_request(self, ids) -> None:
        self._touch()
        for rid in [ids] if isinstance(ids, str) else list(ids):
            if self.requests.pop(rid, None) is not None:
                self.aborted.append(rid)
                self.kv_cache.num_free_blocks += 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.steps += 1
        time.sleep(0.002)  # the forward pass
        if any(POISON in ids and len(out) >= 2 for ids, _, out in self.requests.values()):
            raise RuntimeError("kernel exploded")
        outputs = []
        for rid, (ids, params, out) in list(self.requests.items()):
            out.append(7)
            self.num_generated_tokens += 1
            done = len(out) >= params.max_tokens
            if done:
                del self.requests[rid]
                self.kv_cache.num_free_blocks += 1
            outputs.append(RequestOutput(rid, None, ids, [CompletionOutput(
                0, "x" * len(out), list(out), finish_reason="length" if done else None)], done))
        return outputs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.fixture
def engine():
    e = AsyncLLMEngine(ScriptedEngine())
    yield e
    e.shutdown()


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n)


def test_generate_streams_cumulative_outputs_on_the_engine_thread(engine):
    async def go():
        return [o async for o in engine.generate({"prompt_token_ids": [1, 2]}, params(4), "a")]
    outs = run(go())
    assert outs[-1].finished and outs[-1].outputs[0].text == "xxxx"
    assert all(len(o.outputs[0].token_ids) <= 4 for o in outs)
    assert engine.engine.thread_ids == {engine._thread.ident}  # only the engine thread touched it
    time.sleep(0.05)
    assert engine.stats.num_free_blocks == 8


def test_invalid_request_raises_before_any_output(engine):
    async def go():
        gen = engine.generate({"prompt_token_ids": []}, params(4), "bad")
        with pytest.raises(ValueError, match="empty"):
            await anext(gen)
        # and a duplicate id is refused while the first is running
        first = await engine.add_request("dup", [1], params(50))
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request("dup", [1], params(5))
        first.close()
    run(go())


def test_leaving_early_aborts_and_frees_blocks(engine):
    async def go():
        gen = engine.generate([1, 2, 3], params(10_000), "long")
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()
        for _ in range(200):
            if engine.stats.num_free_blocks == 8:
                break
            await asyncio.sleep(0.01)
    run(go())
    assert engine.engine.aborted == ["long"] and engine.stats.num_free_blocks == 8


def test_cancelled_task_aborts(engine):
    async def go():
        async def consume():
            async for _ in engine.generate([1], params(10_000), "c"):
                pass
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.engine.aborted:
                break
            await asyncio.sleep(0.01)
    run(go())
    assert engine.engine.aborted == ["c"]


def test_failing_step_fails_requests_in_flight_and_loop_goes_on(engine):
    async def consume(prompt, rid, n):
        return [o async for o in engine.generate(prompt, params(n), rid)]

    async def go():
        results = await asyncio.gather(consume([POISON], "poison", 50), consume([1], "bystander", 50),
                                       return_exceptions=True)
        after = await consume([1], "after", 3)
        return results, after
    results, after = run(go())
    assert all(isinstance(r, RuntimeError) and "kernel exploded" in str(r) for r in results)
    assert after[-1].finished and engine.is_running
    assert engine.stats.num_free_blocks == 8


def test_idle_loop_blocks_instead_of_spinning(engine):
    run(_drain(engine.generate([1], params(2), "one")))
    steps = engine.engine.steps
    time.sleep(0.3)
    assert engine.engine.steps == steps


async def _drain(gen):
    async for _ in gen:
        pass


def test_shutdown_fails_pending_and_refuses_new(engine):
    async def go():
        stream = await engine.add_request("pending", [1], params(100_000))
        await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", [1], params(3))
    run(go())
    assert not engine.is_running


# ---- the HTTP layer on top of it ---------------------------------------------------------------
def _app(engine):
    from aphrodite.endpoints.openai.api_server import build_app
    return build_app(engine, argparse.Namespace(disable_log_stats=True))


def test_error_inside_stream_is_an_sse_error_event(engine):
    async def go():
        transport = httpx.ASGITransport(app=_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"model": "scripted", "prompt": [POISON], "max_tokens": 20,
                                                      "stream": True})
            whole = await c.post("/v1/completions", json={"model": "scripted", "prompt": [POISON], "max_tokens": 20})
            ok = await c.post("/v1/completions", json={"model": "scripted", "prompt": [1, 2], "max_tokens": 3})
            health = await c.get("/health")
        return r, whole, ok, health
    r, whole, ok, health = run(go())
    assert r.status_code == 200
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3][len("data: "):])
    assert "kernel exploded" in error["error"]["message"] and set(error["error"]) == {"message", "type", "param",
                                                                                      "code"}
    assert all("choices" in json.loads(e[len("data: "):]) for e in events[:-3])
    assert whole.status_code == 500 and "kernel exploded" in whole.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "xxx"
    assert ok.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert health.status_code == 200


def test_dead_engine_makes_health_fail(engine):
    engine.shutdown()

    async def go():
        transport = httpx.ASGITransport(app=_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/health"), await c.post("/v1/completions", json={"model": "scripted",
                                                                                  "prompt": [1]})
    health, completion = run(go())
    assert health.status_code == 503 and completion.status_code == 503
