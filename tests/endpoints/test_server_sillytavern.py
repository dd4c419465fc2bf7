"""SillyTavern's "Text Completion" connector of type Aphrodite against ``/v1/completions``.

The bodies are built as SillyTavern's ``getTextGenGenerationData`` builds them for Aphrodite (its common
fields, then the Aphrodite ones; ``undefined`` values left out, as ``JSON.stringify`` does), and its server
forwards them unchanged. Each is compared with the same request in our canonical field names.
"""
from __future__ import annotations

import json

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "User: Tell me a short story about a cat.\nAssistant:"
STOP = ["\nUser:", "\n***"]


def _complete(http: httpx.Client, body: dict) -> str:
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _token_ids(http: httpx.Client, text: str) -> list[int]:
    """The tokenizer's ids for ``text`` (the tokenizer, not the sampler under test)."""
    r = http.post("/v1/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def sillytavern_body(prompt: str, max_tokens: int, bans: list[int], bias: dict[str, float]) -> dict:
    """What SillyTavern (API type Aphrodite) sends with its default settings but for a few realistic changes:
    greedy (temp 0), DRY on, a DRY range, token bans and a logit bias."""
    return {
        # common params
        "prompt": prompt, "model": MODEL, "max_new_tokens": max_tokens, "max_tokens": max_tokens,
        "logprobs": 10, "temperature": 0, "top_p": 0.9, "typical_p": 1, "typical": 1, "sampler_seed": -1,
        "min_p": 0.05, "repetition_penalty": 1.1, "frequency_penalty": 0, "presence_penalty": 0, "top_k": 40,
        "skew": 0, "min_tokens": 0, "add_bos_token": True, "smoothing_factor": 0, "smoothing_curve": 1,
        "dry_allowed_length": 2, "dry_multiplier": 0.8, "dry_base": 1.75,
        "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]', "dry_penalty_last_n": 256, "max_tokens_second": 0,
        "stopping_strings": STOP, "stop": STOP, "truncation_length": 2048, "ban_eos_token": False,
        "skip_special_tokens": True, "top_a": 0, "tfs": 1, "mirostat_mode": 0, "mirostat_tau": 5,
        "mirostat_eta": 0.1, "custom_token_bans": bans, "banned_strings": [], "api_type": "aphrodite",
        "api_server": "http://127.0.0.1:2242", "legacy_api": False, "xtc_threshold": 0.1, "xtc_probability": 0,
        # Aphrodite's params (same values where repeated)
        "n": 1, "temperature_last": True, "eta_cutoff": 0, "epsilon_cutoff": 0, "ignore_eos": False,
        "spaces_between_special_tokens": True, "guided_grammar": "", "guided_json": {}, "early_stopping": False,
        "include_stop_str_in_output": False,
        "logit_bias": bias,
    }


def canonical_body(prompt: str, max_tokens: int, bans: list[int], bias: dict[str, float]) -> dict:
    """The same request in our own field names; a ban is a -100 bias, which greedy decoding never picks."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "top_p": 0.9,
            "min_p": 0.05, "top_k": 40, "repetition_penalty": 1.1, "temperature_last": True, "dry_multiplier": 0.8,
            "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breakers": ["\n", ":", "\"", "*"],
            "dry_range": 256, "stop": STOP, "logit_bias": {**bias, **{str(t): -100 for t in bans}}}


def test_sillytavern_connects_and_counts_tokens(http):
    """Its status check reads the model ids from /v1/models; its remote token counter posts to /v1/tokenize
    and reads ``count`` and ``tokens``."""
    assert MODEL in [m["id"] for m in http.get("/v1/models").json()["data"]]
    r = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) == 2


def test_sillytavern_body_equals_canonical_request(http):
    plain = _complete(http, canonical_body(PROMPT, 24, [], {}))
    first, second = _token_ids(http, plain)[:2]
    bans, bias = [first], {str(second): -5.0}
    body = sillytavern_body(PROMPT, 24, bans, bias)
    got = _complete(http, body)
    assert got == _complete(http, canonical_body(PROMPT, 24, bans, bias))
    assert got != plain and first not in _token_ids(http, got)
    # Streamed, as SillyTavern asks when streaming is on: the same text.
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == got


def test_dry_sequence_breakers_json_string_equals_list(http):
    prompt = "Count: 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,"
    dry = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "dry_multiplier": 1.5,
           "dry_allowed_length": 2}
    commas = _complete(http, {**dry, "dry_sequence_breakers": [","]})
    assert _complete(http, {**dry, "dry_sequence_breakers": '[","]'}) == commas
    newlines = _complete(http, {**dry, "dry_sequence_breakers": ["\n"]})
    assert _complete(http, {**dry, "dry_sequence_breakers": '["\\n"]'}) == newlines
    assert commas != newlines  # the breakers matter here, so the two forms are really compared


def test_custom_token_bans_ban_the_tokens(http):
    base = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    plain = _complete(http, base)
    first = _token_ids(http, plain)[0]
    # Also in a chat request, where the bans share the same fields.
    banned = _complete(http, {**base, "custom_token_bans": [first]})
    assert banned != plain
    assert first not in _token_ids(http, banned)
    # With bad words as well, both hold.
    again = _token_ids(http, banned)[0]
    both = _complete(http, {**base, "custom_token_bans": [first], "bad_words": [http.post(
        "/v1/detokenize", json={"tokens": [again]}).json()["prompt"]]})
    assert first not in _token_ids(http, both) and both != banned
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0}
    said = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    tok = _token_ids(http, said)[0]
    r = http.post("/v1/chat/completions", json={**chat, "custom_token_bans": [tok]})
    assert r.status_code == 200, r.text
    assert tok not in _token_ids(http, r.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("field,value", [
    ("dry_sequence_breakers", "not json"), ("dry_sequence_breakers", '{"a": "b"}'),
    ("dry_sequence_breakers", "[1, 2]"), ("custom_token_bans", [-1]), ("custom_token_bans", [10 ** 9]),
    ("custom_token_bans", "1,2"), ("dry_penalty_last_n", -5)])
def test_bad_values_are_400(http, field, value):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    name = "dry_range" if field == "dry_penalty_last_n" else field
    assert name in err["message"]
