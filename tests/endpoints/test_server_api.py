"""The OpenAI API of a real server, driven by the official ``openai`` client (and raw HTTP for the framing)."""
from __future__ import annotations

import asyncio
import json

import pytest

MODEL = "SmolLM2-135M-Instruct"

GREEDY = {"temperature": 0.0}


def test_models(client, http, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = http.get("/v1/models").json()["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "pygmalionai"
    assert card["max_model_len"] == 2048 and isinstance(card["created"], int) and card["root"]
    assert card["permission"][0]["object"] == "model_permission"


def test_getting_started_example(client):
    """The seed's Python example, with the default model standing in for Llama."""
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=1.1,
                                           extra_body={"min_p": 0.1})
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.text
    assert completion.usage.prompt_tokens == 4 and completion.usage.completion_tokens <= 16
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_health_version_metrics(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    text = http.get("/metrics").text
    for name in ("aphrodite:num_requests_running", "aphrodite:num_requests_waiting", "aphrodite:kv_cache_usage_perc",
                 "aphrodite:prompt_tokens_total", "aphrodite:generation_tokens_total",
                 "aphrodite:time_to_first_token_seconds_bucket", "aphrodite:time_per_output_token_seconds_bucket"):
        assert name in text


def test_completion_stream_matches_whole_and_usage(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, **GREEDY)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_batch_of_prompts_n_and_ids(client, http):
    ids = http.post("/v1/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    out = client.completions.create(model=MODEL, prompt=["Hello there", "One two"], n=2, max_tokens=5,
                                    extra_body={"ignore_eos": True}, **GREEDY)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1]  # greedy: both samples of a prompt agree
    assert out.usage.completion_tokens == 20
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, **GREEDY)
    as_id_lists = client.completions.create(model=MODEL, prompt=[ids], max_tokens=5, **GREEDY)
    assert as_ids.choices[0].text == as_id_lists.choices[0].text == by_index[0]
    assert as_ids.usage.prompt_tokens == len(ids)
    # The same batch streamed: chunks of all four choices interleave, each ends once.
    texts, finished = {i: "" for i in range(4)}, []
    for chunk in client.completions.create(model=MODEL, prompt=["Hello there", "One two"], n=2, max_tokens=5,
                                           stream=True, extra_body={"ignore_eos": True}, **GREEDY):
        texts[chunk.choices[0].index] += chunk.choices[0].text
        if chunk.choices[0].finish_reason:
            finished.append(chunk.choices[0].index)
    assert sorted(finished) == [0, 1, 2, 3] and texts == by_index


def test_completion_logprobs_and_echo(client):
    out = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=4, logprobs=3, echo=True,
                                    **GREEDY)
    c = out.choices[0]
    lp = c.logprobs
    assert c.text.startswith("Hello world")
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == sorted(lp.text_offset)
    for i in range(1, len(lp.tokens)):
        assert 3 <= len(lp.top_logprobs[i]) <= 4
        assert lp.tokens[i] in lp.top_logprobs[i]
    # Greedy: the chosen completion token is the most likely one.
    for i in range(n_prompt, len(lp.tokens)):
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()))


def test_completion_stop_string_streams_no_text_that_is_cut(client):
    kw = dict(model=MODEL, prompt="Count: one, two, three,", max_tokens=30, stop=[" six", "seven"], **GREEDY)
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].stop_reason == " six"
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw)]
    assert "".join(pieces) == whole.choices[0].text
    assert not any("six" in p for p in pieces)


def test_chat_whole_and_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        max_completion_tokens=6, logprobs=True, top_logprobs=2, **GREEDY)
    c = out.choices[0]
    assert out.object == "chat.completion" and c.message.role == "assistant" and c.message.content
    assert out.usage.completion_tokens == len(c.logprobs.content) <= 6
    assert "".join(t.token for t in c.logprobs.content) == c.message.content
    for t in c.logprobs.content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


def test_chat_stream_order_and_sse_framing(client, http):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in d["delta"] for d in deltas[1:])
    assert deltas[-1]["finish_reason"] == whole.choices[0].finish_reason and deltas[-1]["delta"] == {}
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    assert "".join(d["delta"].get("content", "") for d in deltas) == whole.choices[0].message.content
    assert chunks[-1]["usage"] == whole.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                   "total_tokens"})


def test_chat_async_stream_and_continue_final_message(server):
    from openai import AsyncOpenAI

    async def go():
        client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."},
                                   {"role": "assistant", "content": "Once upon a time"}],
            max_tokens=5, stream=True, extra_body={"add_generation_prompt": False, "continue_final_message": True},
            **GREEDY)
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        whole = await client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        await client.close()
        return text, whole

    text, whole = asyncio.run(go())
    assert text and whole.choices[0].text is not None


def test_tokenize_detokenize(http):
    r = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["max_model_len"] == 2048
    chat = http.post("/v1/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 5
    assert http.post("/v1/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    assert http.post("/v1/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_greedy_over_http_equals_llm_generate(client):
    """The same prompts through ``LLM`` in this process and through the server give the same text."""
    import torch

    from aphrodite import LLM, SamplingParams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(max_model_len=256, num_gpu_blocks_override=32)
        params = SamplingParams(temperature=0.0, max_tokens=24)
        offline = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        offline_chat = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    finally:
        torch.set_num_threads(threads)
    online = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, **GREEDY)
    assert online.choices[0].text == offline.text
    assert online.usage.completion_tokens == len(offline.token_ids)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, **GREEDY)
    assert chat.choices[0].message.content == offline_chat.text
