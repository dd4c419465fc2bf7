"""Behaviour that real clients rely on and vLLM defines: echo without generation, stream options."""
from __future__ import annotations

import json

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
USER = [{"role": "user", "content": "Hi"}]


def _events(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_echo_with_max_tokens_zero_returns_the_prompt_only(client, http):
    """vLLM (and lm-eval's loglikelihood requests) score a prompt with echo, logprobs and max_tokens 0."""
    prompt = "Hello world, how are you"
    n_prompt = len(http.post("/v1/tokenize", json={"prompt": prompt}).json()["tokens"])
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = out.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == prompt
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == 0
    # Several prompts, n > 1, no logprobs: every choice is its prompt.
    out = client.completions.create(model=MODEL, prompt=["One", "Two three"], n=2, max_tokens=0, echo=True)
    assert {c.index: c.text for c in out.choices} == {0: "One", 1: "One", 2: "Two three", 3: "Two three"}
    # Streamed: one chunk with the prompt, then the usage.
    chunks = _events(http, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True,
                                               "logprobs": 1, "stream": True,
                                               "stream_options": {"include_usage": True}})
    texts = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    assert texts == prompt
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 0


def test_max_tokens_zero_without_echo_is_refused(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_stream_options_without_stream_is_refused(http):
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": USER})):
        r = http.post(path, json={"model": MODEL, "max_tokens": 2, "stream_options": {"include_usage": True},
                                  **body})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "stream_options"
        # null is the same as leaving it out
        r = http.post(path, json={"model": MODEL, "max_tokens": 2, "stream_options": None, **body})
        assert r.status_code == 200


def test_continuous_usage_stats_on_every_chunk(http):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = _events(http, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3,
                                               "temperature": 0, "ignore_eos": True, "stream": True,
                                               "stream_options": opts})
    assert all(ch["usage"] is not None for ch in chunks)
    counts = [ch["usage"]["completion_tokens"] for ch in chunks]
    assert counts == sorted(counts) and counts[-1] == 3
    chunks = _events(http, "/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 3,
                                                    "temperature": 0, "ignore_eos": True, "stream": True,
                                                    "stream_options": opts})
    assert all(ch["usage"] is not None for ch in chunks)
    assert chunks[0]["usage"]["completion_tokens"] == 0 and chunks[0]["usage"]["prompt_tokens"] > 0
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    # Without the flag, usage stays null until the last chunk.
    chunks = _events(http, "/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 3,
                                                    "stream": True, "stream_options": {"include_usage": True}})
    assert all(ch["usage"] is None for ch in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] <= 3


def test_json_body_sent_as_curl_does(http):
    """``curl -d '{...}'`` declares application/x-www-form-urlencoded; the body is still read as JSON."""
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    for ctype in ("application/x-www-form-urlencoded", "text/plain"):
        r = http.post("/v1/completions", content=body, headers={"content-type": ctype})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
    r = http.post("/v1/completions", content="model=x&prompt=y",
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_vllm_root_routes(http):
    """vLLM's /tokenize, /detokenize and /ping, next to Aphrodite's /v1/tokenize and /health."""
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200
    assert r.json() == http.post("/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json() == {"prompt": "Hello world"}
    assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200


def test_logit_bias_is_clamped_to_openai_range(client):
    """A bias past float32's range would turn the logits into inf and NaN; it counts as +-100 (vLLM)."""
    messages = [{"role": "user", "content": "hi"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True)
    token = "19556"  # "Hello"
    huge = client.chat.completions.create(logit_bias={token: 1e39}, **kw).choices[0]
    capped = client.chat.completions.create(logit_bias={token: 100}, **kw).choices[0]
    assert huge.message.content == capped.message.content == "HelloHelloHello"
    assert [t.logprob for t in huge.logprobs.content] == [t.logprob for t in capped.logprobs.content]


def test_prompt_over_context_without_max_tokens_is_context_length_exceeded(client, http):
    messages = [{"role": "user", "content": "hello " * 2100}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert "maximum context length is 2048 tokens" in e.value.message
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello " * 2100, "max_tokens": None})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"


def test_chat_prompt_logprobs(http):
    """vLLM's prompt_logprobs on chat: a top-level list, one entry per prompt token, the first null."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 1, "prompt_logprobs": 1}
    out = http.post("/v1/chat/completions", json=body).json()
    lps = out["prompt_logprobs"]
    assert len(lps) == out["usage"]["prompt_tokens"] and lps[0] is None
    for entry in lps[1:]:
        assert 1 <= len(entry) <= 2
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
    body.pop("prompt_logprobs")
    assert http.post("/v1/chat/completions", json=body).json()["prompt_logprobs"] is None


def test_truncate_prompt_tokens(client, http):
    """vLLM's truncate_prompt_tokens keeps the last k prompt tokens, so a long prompt still fits."""
    long_prompt = "hello " * 2100
    out = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2,
                                    extra_body={"truncate_prompt_tokens": 100})
    assert out.usage.prompt_tokens == 100
    echoed = client.completions.create(model=MODEL, prompt="one two three four five", max_tokens=1, echo=True,
                                       temperature=0, extra_body={"truncate_prompt_tokens": 2})
    assert echoed.usage.prompt_tokens == 2 and echoed.choices[0].text.startswith(" four five")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}],
                                          max_tokens=2, extra_body={"truncate_prompt_tokens": 50})
    assert chat.usage.prompt_tokens == 50
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "truncate_prompt_tokens": 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_bad_max_completion_tokens_is_named_as_sent(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_completion_tokens": 0})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_completion_tokens"
    assert err["message"].startswith("max_completion_tokens")
