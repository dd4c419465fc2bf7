"""Many clients at once, and clients that leave: usage stays right and no KV block is left behind."""
from __future__ import annotations

import asyncio

import httpx

MODEL = "SmolLM2-135M-Instruct"


def _idle(m: dict[str, float]) -> bool:
    return (m["aphrodite:kv_cache_usage_perc"] == 0.0 and m["aphrodite:num_requests_running"] == 0
            and m["aphrodite:num_requests_waiting"] == 0)


def test_32_concurrent_streams(server, http):
    from openai import AsyncOpenAI
    n_tokens = 12
    prompts = [f"Story number {i}: once upon a time" for i in range(32)]
    prompt_lens = [http.post("/v1/tokenize", json={"prompt": p}).json()["count"] for p in prompts]

    async def completion(client, prompt):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n_tokens, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, finish, usage

    async def chat(client, prompt):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=n_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, finish, usage

    async def go():
        client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=180)
        jobs = [(completion if i % 2 == 0 else chat)(client, p) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*jobs)
        await client.close()
        return results

    before = server.metrics()["aphrodite:generation_tokens_total"]
    results = asyncio.run(go())
    assert len(results) == 32
    for i, (text, finish, usage) in enumerate(results):
        assert finish == "length" and text
        assert usage.completion_tokens == n_tokens
        if i % 2 == 0:
            assert usage.prompt_tokens == prompt_lens[i]
        assert usage.total_tokens == usage.prompt_tokens + n_tokens
    m = server.wait_metrics(_idle)
    assert _idle(m)
    assert m["aphrodite:generation_tokens_total"] - before == 32 * n_tokens


def test_stream_disconnect_frees_kv_blocks(server):
    body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():  # leaving this loop drops the connection
                seen += line.startswith("data: ")
                if seen == 3:
                    busy = server.metrics()
                    break
            assert busy["aphrodite:kv_cache_usage_perc"] > 0 and busy["aphrodite:num_requests_running"] == 1
    # The connection is closed: the request is aborted and its blocks freed.
    m = server.wait_metrics(_idle, timeout=10)
    assert _idle(m), m
    assert m["aphrodite:generation_tokens_total"] - busy["aphrodite:generation_tokens_total"] < 200


def test_non_streaming_disconnect_frees_kv_blocks(server):
    body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 1500, "ignore_eos": True}
    try:
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    except httpx.ReadTimeout:
        pass
    m = server.wait_metrics(_idle, timeout=10)
    assert _idle(m), m
