"""The KoboldAI API (``--launch-kobold-api``) and the web chat page, on a real server with API keys.

References: the OpenAI completions route through the official openai client (same settings, greedy or
seeded: same text), transformers' tokenizer on the same GGUF (truncation, token counts), and the
KoboldAI/KoboldCpp wire formats (SSE events, genkey polling, abort)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess  # tests/ is on sys.path (rootdir conftest)

from aphrodite.endpoints.kobold.protocol import sampler_priority
from aphrodite.sampling_params import DEFAULT_SAMPLER_ORDER, SamplerID, SamplingParams

KEY = "kobold-key"
NAME = "smol"
MAX_MODEL_LEN = 512
REPO = Path(__file__).resolve().parents[2]
# A chat prompt the model answers briefly, then ends with its EOS token.
CHAT_PROMPT = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def kobold_server() -> Iterator[tuple[ServerProcess, object]]:
    """The Kobold API on, API keys on; with transformers' tokenizer of the same GGUF (loaded meanwhile)."""
    server = ServerProcess(["--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "96",
                            "--launch-kobold-api", "--api-keys", KEY, "--served-model-name", NAME,
                            "--max-num-seqs", "8"])
    try:
        from transformers import AutoTokenizer

        from aphrodite.config import default_model_path
        gguf = Path(default_model_path())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        yield server.wait_ready(), tokenizer
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kai(kobold_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kobold_server[0].url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(kobold_server):
    return kobold_server[1]


@pytest.fixture(scope="module")
def openai_client(kobold_server):
    from openai import OpenAI
    return OpenAI(base_url=kobold_server[0].base_url, api_key=KEY, max_retries=0, timeout=120)


def _kai(prompt: str, max_length: int = 16, **fields) -> dict:
    return {"prompt": prompt, "max_length": max_length, "max_context_length": MAX_MODEL_LEN, **fields}


def _generate(kai: httpx.Client, body: dict) -> dict:
    r = kai.post("/api/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(kai: httpx.Client, body: dict) -> list[dict]:
    """The data of every SSE event, checking each is an 'event: message' with a JSON 'data:' line."""
    events = []
    with kai.stream("POST", "/api/extra/generate/stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        for chunk in r.iter_text():
            buffer += chunk
            *done, buffer = buffer.split("\n\n")
            for event in done:
                lines = event.split("\n")
                assert lines[0] == "event: message" and lines[1].startswith("data: "), event
                events.append(json.loads(lines[1][len("data: "):]))
    assert buffer == ""
    return events


# ---- generation: the same text as the OpenAI route -----------------------------------------------------
@pytest.mark.parametrize("kobold, openai_kwargs", [
    ({"temperature": 0}, {"temperature": 0}),
    ({"temperature": 0, "stop_sequence": ["", "."]}, {"temperature": 0, "stop": ["."]}),  # "" is an unused slot
    ({"temperature": 0, "stop_sequence": ["."], "include_stop_str_in_output": True},
     {"temperature": 0, "stop": ["."], "extra_body": {"include_stop_str_in_output": True}}),
    # Seeded sampling with Kobold's names for Aphrodite's samplers.
    ({"temperature": 0.9, "sampler_seed": 7, "top_p": 0.95, "top_k": 50, "rep_pen": 1.1, "typical": 0.95,
      "min_p": 0.02, "tfs": 0.99, "eps_cutoff": 0.0002, "top_a": 0.1},
     {"temperature": 0.9, "seed": 7, "top_p": 0.95, "extra_body": {
         "top_k": 50, "repetition_penalty": 1.1, "typical_p": 0.95, "min_p": 0.02, "tfs": 0.99,
         "epsilon_cutoff": 0.0002, "top_a": 0.1}}),
    ({"temperature": 1.0, "sampler_seed": 3, "dynatemp_range": 0.5, "dynatemp_exponent": 1.5,
      "smoothing_factor": 0.3, "xtc_threshold": 0.05, "xtc_probability": 0.5, "dry_multiplier": 0.8,
      "dry_allowed_length": 1, "dry_sequence_breakers": '["\\n", ","]', "presence_penalty": 0.5},  # SillyTavern's
     {"temperature": 1.0, "seed": 3, "presence_penalty": 0.5, "extra_body": {
         "dynatemp_min": 0.5, "dynatemp_max": 1.5, "dynatemp_exponent": 1.5, "smoothing_factor": 0.3,
         "xtc_threshold": 0.05, "xtc_probability": 0.5, "dry_multiplier": 0.8, "dry_allowed_length": 1,
         "dry_sequence_breakers": ["\n", ","]}}),
], ids=["greedy", "stop", "stop-kept", "seeded-samplers", "seeded-dynatemp-dry-xtc"])
def test_generate_equals_openai_completion(kai, openai_client, kobold, openai_kwargs):
    prompt = "Once upon a time, in a small village,"
    got = _generate(kai, _kai(prompt, 24, **kobold))
    want = openai_client.completions.create(model=NAME, prompt=prompt, max_tokens=24, **openai_kwargs).choices[0]
    assert got == {"results": [{"text": want.text, "finish_reason": want.finish_reason}]}
    assert want.text


# What SillyTavern's KoboldCpp connector and KoboldAI Lite send (their defaults; no genkey from SillyTavern).
CLIENT_BODY = {
    "max_context_length": 8192, "max_length": 12, "rep_pen": 1.1, "rep_pen_range": 320, "rep_pen_slope": 1,
    "temperature": 0.7, "tfs": 1, "top_a": 0, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "typical": 1,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False, "use_default_badwordsids": False, "mirostat": 0,
    "mirostat_eta": 0.1, "mirostat_tau": 5, "grammar": "", "grammar_retain_state": False, "sampler_seed": 11,
    "n": 1, "trim_stop": True, "stop_sequence": ["\nUser:", "\n***"], "quiet": True, "dynatemp_range": 0,
    "dynatemp_exponent": 1, "smoothing_factor": 0, "smoothing_curve": 1, "dry_allowed_length": 2,
    "dry_multiplier": 0, "dry_base": 1.75, "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]',
    "dry_penalty_last_n": 0, "xtc_threshold": 0.1, "xtc_probability": 0, "nsigma": 0, "banned_tokens": [],
    "logit_bias": {}, "presence_penalty": 0, "memory": "", "images": [], "bypass_eos": False,
    "render_special": False, "gui_settings": False, "use_world_info": False, "streaming": True, "can_abort": True,
    "prompt": "User: Hello, who are you?\nAssistant:"}


def test_client_bodies_generate_and_stream_alike(kai, openai_client):
    """A full client body is accepted on both routes; seeded, both give the same text, which is the OpenAI
    route's with the same samplers (SillyTavern's sampler order puts temperature last among those on)."""
    body = CLIENT_BODY
    got = _generate(kai, body)["results"][0]
    streamed = _stream(kai, body)
    assert "".join(e["token"] for e in streamed) == got["text"]
    assert streamed[-1]["finish_reason"] == got["finish_reason"]
    want = openai_client.completions.create(
        model=NAME, prompt=body["prompt"], max_tokens=12, temperature=0.7, top_p=0.9, seed=11,
        stop=["\nUser:", "\n***"],
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "temperature_last": True}).choices[0]
    assert got == {"text": want.text, "finish_reason": want.finish_reason}


def test_lengths_default_as_koboldcpp(kai, openai_client):
    """Clients that leave out max_context_length (the model's) and max_length (100) are served."""
    prompt = CHAT_PROMPT  # answered briefly: the default max_length is allowed, not used up
    got = _generate(kai, {"prompt": prompt, "temperature": 0})["results"][0]
    want = openai_client.completions.create(model=NAME, prompt=prompt, max_tokens=100, temperature=0).choices[0]
    assert got == {"text": want.text, "finish_reason": want.finish_reason}


def test_prompt_keeps_the_last_tokens_of_the_context(kai, openai_client, tokenizer):
    """Kobold sends whole stories: the last max_context_length - max_length tokens are kept; a client
    context larger than the model's is held to the model's."""
    prompt = " ".join(f"line {i} of a long story." for i in range(120))
    ids = tokenizer.encode(prompt)
    assert len(ids) > 300
    got = _generate(kai, {**_kai(prompt, 8, temperature=0), "max_context_length": 64})
    want = openai_client.completions.create(model=NAME, prompt=ids[-56:], max_tokens=8, temperature=0).choices[0]
    assert got["results"][0]["text"] == want.text
    long_ids = tokenizer.encode(prompt * 4)
    assert len(long_ids) > MAX_MODEL_LEN
    got = _generate(kai, {**_kai(prompt * 4, 8, temperature=0), "max_context_length": 100_000})
    want = openai_client.completions.create(model=NAME, prompt=long_ids[-(MAX_MODEL_LEN - 8):], max_tokens=8,
                                            temperature=0).choices[0]
    assert got["results"][0]["text"] == want.text


def test_bypass_eos_and_render_special(kai, openai_client):
    """KoboldCpp's bypass_eos generates past the EOS token, render_special shows special tokens: the OpenAI
    route's ignore_eos and skip_special_tokens=false."""
    got = _generate(kai, _kai(CHAT_PROMPT, 24, temperature=0, bypass_eos=True, render_special=True))["results"][0]
    want = openai_client.completions.create(model=NAME, prompt=CHAT_PROMPT, max_tokens=24, temperature=0, extra_body={
        "ignore_eos": True, "skip_special_tokens": False}).choices[0]
    assert got == {"text": want.text, "finish_reason": "length"}  # without bypass_eos: "stop" (a brief answer)


def test_memory_stays_and_the_prompt_is_cut_after_it(kai, openai_client, tokenizer):
    """KoboldCpp's ``memory`` (KoboldAI Lite sends its story memory so): kept whole at the start, the prompt
    cut to what fits after it."""
    memory = "[Setting: a quiet harbour town. Characters: Ana, a sailor.]\n"
    prompt = " ".join(f"Day {i}: the boats came back." for i in range(60))
    mem_ids, prompt_ids = tokenizer.encode(memory), tokenizer.encode(prompt, add_special_tokens=False)
    assert len(prompt_ids) > 100
    got = _generate(kai, {**_kai(prompt, 8, temperature=0), "memory": memory, "max_context_length": 96})
    want = openai_client.completions.create(model=NAME, prompt=mem_ids + prompt_ids[-(88 - len(mem_ids)):],
                                            max_tokens=8, temperature=0).choices[0]
    assert got["results"][0]["text"] == want.text
    short = _generate(kai, {**_kai("", 8, temperature=0), "memory": memory})  # an empty prompt after a memory
    assert short["results"][0]["text"] == openai_client.completions.create(
        model=NAME, prompt=mem_ids, max_tokens=8, temperature=0).choices[0].text


def test_n_results_and_default_badwords(kai):
    got = _generate(kai, _kai("The weather today is", 6, temperature=1.0, n=3, sampler_seed=1))
    assert len(got["results"]) == 3 and all(r["finish_reason"] == "length" for r in got["results"])
    # Greedy forces n = 1 (Aphrodite's mapping).
    assert len(_generate(kai, _kai("The weather today is", 4, temperature=0, n=3))["results"]) == 1
    # The model ends its answer with EOS; use_default_badwordsids bans EOS (and bracket tokens) as Kobold does.
    short = _generate(kai, _kai(CHAT_PROMPT, 64, temperature=0))["results"][0]
    assert short["finish_reason"] == "stop" and "[" not in short["text"]
    banned = _generate(kai, _kai(CHAT_PROMPT, 64, temperature=0, use_default_badwordsids=True))["results"][0]
    assert banned["finish_reason"] == "length" and "[" not in banned["text"] and "]" not in banned["text"]
    assert banned["text"].startswith(short["text"].rstrip())


def test_sampler_order_maps_kobold_ids():
    """Kobold's ids (0 top-k, 1 top-a, 2 top-p, 3 tfs, 4 typical, 5 temperature, 6 rep-pen) reorder those
    samplers in their own places; Aphrodite's others keep theirs; SamplingParams accepts the whole order."""
    S = SamplerID
    order = sampler_priority([6, 0, 1, 3, 4, 2, 5])  # KoboldAI's and SillyTavern's default: temperature last
    assert sorted(order) == sorted(DEFAULT_SAMPLER_ORDER) and order[-3:] == [S.TEMPERATURE, S.QUADRATIC, S.XTC]
    assert order.index(S.PENALTIES) < order.index(S.TOP_P_TOP_K) < order.index(S.TOP_A) < order.index(S.TFS) \
        < order.index(S.TYPICAL_P) < order.index(S.TEMPERATURE)
    kept = [s for s in DEFAULT_SAMPLER_ORDER if s not in (S.PENALTIES, S.TOP_P_TOP_K, S.TOP_A, S.TFS, S.TYPICAL_P,
                                                            S.TEMPERATURE)]
    assert [s for s in order if s in kept] == kept
    assert [i for i, s in enumerate(order) if s in kept] == [i for i, s in enumerate(DEFAULT_SAMPLER_ORDER)
                                                             if s in kept]
    assert sampler_priority([6, 5, 0, 1, 2, 3, 4]) == list(DEFAULT_SAMPLER_ORDER)  # Aphrodite's own order
    assert sampler_priority([6, 5, 0, 9, 1, 2, 3, 4]) == list(DEFAULT_SAMPLER_ORDER)  # unknown ids: ignored
    assert sampler_priority([]) is None and sampler_priority(None) is None
    assert SamplingParams(sampler_priority=order).sampler_order == tuple(order)


def test_sampler_order_on_the_server(kai):
    """A Kobold order in Aphrodite's default order gives the same text (same seed); the Kobold default
    (temperature after min-p) another."""
    body = _kai("My favourite animal is", 24, temperature=1.5, min_p=0.1, sampler_seed=11)
    plain = _generate(kai, body)["results"][0]["text"]
    assert _generate(kai, {**body, "sampler_order": [6, 5, 0, 1, 2, 3, 4]})["results"][0]["text"] == plain
    assert _generate(kai, {**body, "sampler_order": [6, 0, 1, 3, 4, 2, 5]})["results"][0]["text"] != plain


# ---- streaming, polling and aborting by genkey ----------------------------------------------------------
def test_stream_tokens_reassemble_to_the_text(kai):
    for fields in ({"temperature": 0}, {"temperature": 0, "stop_sequence": [" was", "."]}):  # a stop: held back
        body = _kai("Once upon a time, in a small village,", 24, **fields)
        whole = _generate(kai, body)["results"][0]
        events = _stream(kai, body)
        assert "".join(e["token"] for e in events) == whole["text"]
        assert all("finish_reason" not in e for e in events[:-1])
        assert events[-1]["finish_reason"] == whole["finish_reason"]
        assert len(events) > (5 if "stop_sequence" not in fields else 1)


def _poll_check(kai: httpx.Client, genkey: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = kai.get("/api/extra/generate/check", params={"genkey": genkey}).json()["results"][0]["text"]
        if text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"no partial text for {genkey}")


def test_stream_events_parse_with_kobold_lites_regex():
    """KoboldAI Lite reads events with /^event: (.*)\\ndata: (.*)\\n\\n/m, where JavaScript's . stops at
    U+2028/U+2029 too: a token holding them must still make one event line."""
    from aphrodite.endpoints.kobold.api import _event
    js_line = r"[^\n\r\u2028\u2029]*"
    token = "a\u2028b\u2029c\nd\"e"
    m = re.fullmatch(rf"event: ({js_line})\ndata: ({js_line})\n\n", _event({"token": token}))
    assert m is not None and m.group(1) == "message" and json.loads(m.group(2)) == {"token": token}


def test_check_and_abort_a_generation(kai):
    body = _kai(CHAT_PROMPT, 400, temperature=0, use_default_badwordsids=True, genkey="kobold-g1")  # ~seconds
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(_generate(kai, body)))
    worker.start()
    try:
        partial = _poll_check(kai, "kobold-g1")
        again = kai.post("/api/extra/generate/check", json={"genkey": "kobold-g1"}).json()["results"][0]["text"]
        assert again.startswith(partial)
        # Clients that send a fixed genkey run side by side (as on KoboldCpp); the newest is the one checked.
        short = _generate(kai, {**body, "max_length": 3})["results"][0]
        assert short["finish_reason"] == "length"
        assert again.startswith(short["text"]) or short["text"].startswith(again)
        # SillyTavern aborts with an empty body: as KoboldCpp, that stops the one running generation.
        assert kai.post("/api/extra/abort").json() == {}
    finally:
        worker.join(60)
    [out] = result["results"]
    assert out["finish_reason"] == "abort" and out["text"].startswith(again)
    # What it had is the greedy text: a prefix of a shorter run's, or that run's a prefix of it.
    ref = _generate(kai, {**body, "max_length": 40})["results"][0]["text"]  # the genkey is free again
    assert ref.startswith(out["text"]) or out["text"].startswith(ref)
    assert kai.get("/api/extra/generate/check", params={"genkey": "kobold-g1"}).json() == {"results": [{"text": ""}]}
    assert kai.post("/api/extra/abort", json={"genkey": "nobody"}).json() == {}
    assert kai.post("/api/extra/abort", content=b"not json").json() == {}


def test_abort_a_stream(kai):
    body = _kai(CHAT_PROMPT, 400, temperature=0, use_default_badwordsids=True, genkey="kobold-s1")
    received = []
    with kai.stream("POST", "/api/extra/generate/stream", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            received.append(json.loads(line[6:]))
            if len(received) == 3:
                assert kai.get("/api/extra/generate/check", params={"genkey": "kobold-s1"}).json()[
                    "results"][0]["text"].startswith("".join(e["token"] for e in received))
                kai.post("/api/extra/abort", json={"genkey": "kobold-s1"})
    assert received[-1]["finish_reason"] == "abort" and len(received) < 200
    text = "".join(e["token"] for e in received)
    ref = _generate(kai, {**body, "max_length": 40})["results"][0]["text"]
    assert ref.startswith(text) or text.startswith(ref)


# ---- the other routes -------------------------------------------------------------------------------
def test_info_routes(kai, tokenizer):
    expected = {
        "/api/v1/model": {"result": f"aphrodite/{NAME}"}, "/api/latest/model": {"result": f"aphrodite/{NAME}"},
        "/api/v1/info/version": {"result": "1.2.4"},
        "/api/extra/version": {"result": "KoboldCpp", "version": "1.63", "protected": True},
        "/api/v1/config/max_length": {"value": MAX_MODEL_LEN},
        "/api/v1/config/max_context_length": {"value": MAX_MODEL_LEN},
        "/api/extra/true_max_context_length": {"value": MAX_MODEL_LEN},
        "/api/v1/config/soft_prompts_list": {"values": []}, "/api/v1/config/soft_prompt": {"value": ""},
        "/api/extra/preloadstory": {}}
    for path, body in expected.items():
        r = kai.get(path)
        assert r.status_code == 200 and r.json() == body, path
    assert kai.put("/api/v1/config/soft_prompt", json={"value": "x"}).json() == {}
    for text in ("Hello world", "", "Ünïcödé text, with <|im_start|> and numbers 12345."):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert kai.post("/api/extra/tokencount", json={"prompt": text}).json() == {"value": len(ids), "ids": ids}


@pytest.mark.parametrize("body, param, words", [
    ({"max_length": 4}, "prompt", ["Field required"]),
    ({"prompt": 5, "max_length": 4, "max_context_length": 64}, "prompt", ["string"]),
    (_kai(""), "prompt", ["empty"]),
    ({"prompt": "x", "max_length": "4", "max_context_length": 64}, "max_length", ["integer"]),
    (_kai("x", 0), "max_length", ["at least 1"]),
    ({**_kai("x", 65), "max_context_length": 64}, "max_length", ["max_context_length"]),
    (_kai("x", MAX_MODEL_LEN), "max_length", ["maximum context length", str(MAX_MODEL_LEN)]),
    (_kai("x", temperature=-1), "temperature", ["non-negative"]),
    (_kai("x", rep_pen=0), "rep_pen", ["greater than 0"]),
    (_kai("x", mirostat=1), "mirostat", ["0 (off) or 2"]),
    (_kai("x", typical=2), "typical", ["[0, 1]"]),
    (_kai("x", n=100, temperature=1), "n", ["max_num_seqs (8)"]),
    (_kai("x", grammar="root ::= ("), None, []),
], ids=["missing-prompt", "prompt-type", "empty-prompt", "string-int", "max-length-0", "length-over-context",
        "over-model-context", "temperature", "rep-pen", "mirostat-1", "typical", "n-over-max-seqs", "bad-grammar"])
def test_bad_requests_are_400_with_a_clear_message(kai, body, param, words):
    r = kai.post("/api/v1/generate", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and all(w in err["message"] for w in words), err
    assert kai.post("/api/extra/generate/stream", json=body).status_code == 400


def test_malformed_bodies_and_the_server_goes_on(kai):
    for path in ("/api/v1/generate", "/api/extra/generate/stream", "/api/extra/tokencount"):
        r = kai.post(path, content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
        assert kai.post(path, json=[1, 2]).status_code == 400
    # Unknown and unsupported Kobold fields are ignored, as Aphrodite does.
    got = _generate(kai, _kai("Hi", 4, temperature=0, rep_pen_range=1024, use_memory=True, frmtrmblln=False,
                              some_new_field={"x": 1}))
    assert got["results"][0]["finish_reason"] == "length"


def test_routes_need_the_api_key(kobold_server, kai):
    server = kobold_server[0]
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        for method, path in (("POST", "/api/v1/generate"), ("GET", "/api/v1/config/soft_prompts_list"),
                             ("POST", "/api/extra/generate/stream"), ("GET", "/api/extra/generate/check"),
                             ("POST", "/api/extra/abort"), ("POST", "/api/extra/tokencount")):
            r = anon.request(method, path, json=_kai("x"))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            wrong = anon.request(method, path, json=_kai("x"), headers={"x-api-key": "wrong"})
            assert wrong.status_code == 401, path
        assert anon.post("/api/v1/generate", json=_kai("x", 1), headers={"x-api-key": KEY}).status_code == 200
        # KoboldCpp's discovery routes are open (KoboldAI Lite asks for the model before it sends a key), and
        # /api/extra/version says a key is needed, as KoboldCpp does with a password.
        assert anon.get("/api/v1/model").json() == {"result": f"aphrodite/{NAME}"}
        for path in ("/api/latest/info/version", "/api/v1/config/max_context_length", "/api/v1/config/max_length",
                     "/api/extra/true_max_context_length"):
            assert anon.get(path).status_code == 200, path
        assert anon.get("/api/extra/version").json()["protected"] is True
        for path in ("/chat", "/"):  # the page is open: the key is typed into it
            assert anon.get(path).status_code == 200 and anon.head(path).status_code == 200
        # A browser client on another origin (KoboldAI Lite): the preflight passes without the key, and the
        # answers (a 401 too) carry the CORS header, so the page can read them.
        origin = {"Origin": "http://lite.example"}
        pre = anon.options("/api/v1/generate", headers={**origin, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", origin["Origin"])
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        refused = anon.post("/api/v1/generate", json=_kai("x"), headers=origin)
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"]
        assert kai.get("/api/v1/model", headers=origin).headers["access-control-allow-origin"]
    schema = kai.get("/openapi.json").json()
    for path in ("/api/v1/generate", "/api/extra/generate/stream", "/api/extra/tokencount"):
        assert schema["paths"][path]["post"]["security"], path
    assert not any(p.startswith("/api/latest") for p in schema["paths"]) and "/chat" not in schema["paths"]


def test_kobold_api_is_off_by_default(http):
    assert http.post("/api/v1/generate", json=_kai("x")).status_code == 404
    assert http.get("/api/v1/model").status_code == 404


# ---- the chat page ----------------------------------------------------------------------------------
def test_chat_page_is_self_contained_and_same_origin(http):
    for path in ("/chat", "/"):
        r = http.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    assert page.startswith("<!doctype html>") and "</html>" in page
    # Nothing from elsewhere: no external scripts, styles, fonts or images, no absolute URLs at all.
    assert not re.search(r"https?:|//[a-z]|<link|<img|<iframe|@import|url\(", page, re.I)
    assert not re.search(r"<script[^>]+src", page, re.I)
    assert re.findall(r'fetch\("([^"]+)"', page) == ["/v1/models", "/v1/chat/completions"]
    assert all(x in page for x in ('"Authorization"', "temperature", "max_tokens", "stream: true", "<select"))
    # It ships with the package.
    assert '"aphrodite.endpoints.web" = ["*.html"]' in (REPO / "pyproject.toml").read_text()
    from aphrodite.endpoints.web import chat_page
    assert chat_page().decode() == page


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's script")
def test_chat_page_streams_a_conversation(kobold_server, kai, openai_client, tmp_path):
    """The page's own script (in Node, with a minimal DOM) lists the models, streams two replies and keeps
    the conversation: each reply equals the openai client's for the same history (greedy, 12 tokens)."""
    server = kobold_server[0]
    page = tmp_path / "chat.html"
    page.write_text(kai.get("/chat").text)

    def run(key: str, *turns: str) -> dict:
        proc = subprocess.run(["node", str(Path(__file__).with_name("chat_page_harness.js")), str(page), server.url,
                               key, *turns], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    seen = run(KEY, "Say hi.", "Now say bye.")
    assert seen["fetched"] == ["/v1/models", "/v1/chat/completions", "/v1/chat/completions"]
    assert seen["models"] == [NAME]
    history: list[dict] = []
    for turn, bubble_pair in zip(("Say hi.", "Now say bye."), zip(seen["bubbles"][::2], seen["bubbles"][1::2])):
        history.append({"role": "user", "content": turn})
        reply = openai_client.chat.completions.create(model=NAME, messages=history, temperature=0,
                                                      max_tokens=12).choices[0].message.content
        history.append({"role": "assistant", "content": reply})
        assert [b["text"] for b in bubble_pair] == [turn, reply] and reply
    assert seen["messages"] == history and len(seen["bubbles"]) == 4
    refused = run("wrong-key")
    assert refused["models"] == [] and refused["bubbles"] == [
        {"kind": "msg error", "text": "Could not list the models: Enter the server's API key."}]
