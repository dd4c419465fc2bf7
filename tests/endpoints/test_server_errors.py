"""Every kind of bad input gets the right 4xx and an OpenAI error body, and the server keeps serving."""
from __future__ import annotations

import pytest

MODEL = "SmolLM2-135M-Instruct"
LONG_PROMPT = "hello " * 2100  # > 2048 tokens

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (id, path, body (dict) or raw bytes, status, param, substrings of the message)
CASES = [
    ("malformed-json", C, b'{"model": "x", "prompt": ', 400, None, ["JSON"]),
    ("not-an-object", C, b'["a list"]', 400, None, []),
    ("unknown-model", C, {"model": "gpt-4", "prompt": "x"}, 404, "model", ["gpt-4"]),
    ("unknown-model-chat", CHAT, {"model": "gpt-4", "messages": USER}, 404, "model", []),
    ("missing-model", C, {"prompt": "x"}, 400, "model", ["model"]),
    ("missing-prompt", C, {"model": MODEL}, 400, "prompt", ["prompt"]),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages", ["messages"]),
    ("wrong-type-max-tokens", C, {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", []),
    ("wrong-type-messages", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages", []),
    ("wrong-type-prompt", C, {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt", []),
    ("zero-max-tokens", C, {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", ["max_tokens"]),
    ("negative-max-tokens", CHAT, {"model": MODEL, "messages": USER, "max_tokens": -3}, 400, "max_tokens", []),
    ("negative-temperature", C, {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature", []),
    ("top-p-over-1", CHAT, {"model": MODEL, "messages": USER, "top_p": 1.5}, 400, "top_p", ["top_p"]),
    ("n-zero", C, {"model": MODEL, "prompt": "x", "n": 0}, 400, "n", []),
    ("logprobs-over-max", C, {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs", ["20"]),
    ("top-logprobs-over-max", CHAT, {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 25},
     400, "top_logprobs", ["20"]),
    ("prompt-over-context", C, {"model": MODEL, "prompt": LONG_PROMPT}, 400, None, ["2048", "2101"]),
    ("chat-prompt-over-context", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]},
     400, None, ["2048", "21"]),
    ("prompt-plus-max-tokens-over-context", C, {"model": MODEL, "prompt": "x y z", "max_tokens": 2047}, 400,
     "max_tokens", ["2048", "2050"]),
    ("chat-plus-max-tokens-over-context", CHAT, {"model": MODEL, "messages": USER, "max_completion_tokens": 2040},
     400, "max_completion_tokens", ["2048"]),
    ("empty-messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages", ["at least one"]),
    ("unknown-role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages",
     ["wizard"]),
    ("image-part", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages", ["image_url"]),
    ("suffix", C, {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix", ["suffix"]),
    ("empty-prompt-list", C, {"model": MODEL, "prompt": []}, 400, "prompt", []),
    ("stream-best-of", C, {"model": MODEL, "prompt": "x", "best_of": 2, "stream": True}, 400, "best_of", []),
    ("unknown-route", "/v1/nothing-here", {}, 404, None, []),
    # Strict JSON types, as OpenAI: no NaN or Infinity, no bool for an int, no string for a number.
    ("nan-temperature", C, f'{{"model": "{MODEL}", "prompt": "x", "temperature": NaN}}'.encode(), 400,
     "temperature", ["finite"]),
    ("infinity-top-p", CHAT, f'{{"model": "{MODEL}", "messages": [], "top_p": -Infinity}}'.encode(), 400, "top_p",
     ["finite"]),
    ("nan-logit-bias", C, f'{{"model": "{MODEL}", "prompt": "x", "logit_bias": {{"5": NaN}}}}'.encode(), 400,
     "logit_bias", ["finite"]),
    ("bool-token-ids", "/detokenize", {"tokens": [False, True]}, 400, "tokens", []),
    ("bool-prompt-ids", C, {"model": MODEL, "prompt": [True, False]}, 400, "prompt", []),
    ("bool-max-tokens", C, {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens", []),
    ("string-temperature", C, {"model": MODEL, "prompt": "x", "temperature": "0.5"}, 400, "temperature", []),
    ("fractional-n", C, {"model": MODEL, "prompt": "x", "n": 2.5}, 400, "n", []),
    ("int-echo", C, {"model": MODEL, "prompt": "x", "echo": 1}, 400, "echo", []),
    # Admission: n and best_of at most max_num_seqs (256 here).
    ("n-over-max-num-seqs", C, {"model": MODEL, "prompt": "x", "n": 1000000}, 400, "n", ["max_num_seqs", "256"]),
    ("best-of-over-max-num-seqs", C, {"model": MODEL, "prompt": "x", "best_of": 1000}, 400, "best_of",
     ["max_num_seqs"]),
    ("chat-n-over-max-num-seqs", CHAT, {"model": MODEL, "messages": USER, "n": 257}, 400, "n", ["max_num_seqs"]),
    ("tokenize-neither", "/tokenize", {}, 400, None, ["exactly one of prompt or messages"]),
    ("tokenize-both", "/tokenize", {"prompt": "x", "messages": USER}, 400, None, ["exactly one"]),
]


@pytest.mark.parametrize("path,body,status,param,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(http, path, body, status, param, words):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]


def test_unknown_model_code(http):
    err = http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).json()["error"]
    assert err["code"] == "model_not_found" and err["type"] == "NotFoundError"  # OpenAI's code, vLLM's type


def test_openai_client_raises_typed_errors(client):
    import openai
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)


def test_server_keeps_serving_after_bad_input(client, http):
    assert http.get("/health").status_code == 200
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert out.usage.completion_tokens >= 1
