"""API keys (flag and APHRODITE_API_KEY), served names, the body size limit, admission limits, the
OpenAPI schema against the server (schemathesis, every check), and a clean Ctrl-C, on a second server."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

KEYS = ("key-one", "key-two", "env-key")  # two from --api-keys, one from the environment
NAMES = ("smol", "other-name")
BODY_LIMIT = 65536


KEY = "key-one"


def _idle(m: dict[str, float]) -> bool:
    return (m["aphrodite:kv_cache_usage_perc"] == 0.0 and m["aphrodite:num_requests_running"] == 0
            and m["aphrodite:num_requests_waiting"] == 0)


@pytest.fixture(scope="module")
def keyed(auth_server):
    with httpx.Client(base_url=auth_server.url, timeout=120, headers={"x-api-key": KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def anon(auth_server):
    with httpx.Client(base_url=auth_server.url, timeout=60) as c:
        yield c


def _ok_body(name="smol"):
    return {"model": name, "prompt": "Hi", "max_tokens": 2}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/tokenize",
                                  "/v1/detokenize", "/tokenize", "/detokenize", "/api/anything", "/not-a-route"])
def test_protected_routes_need_a_key(anon, path):
    r = anon.get(path) if path in ("/v1/models", "/api/anything") else anon.post(path, json=_ok_body())
    assert r.status_code == 401
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"


def test_wrong_key_refused(anon):
    for headers in ({"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": "key-one"},
                    {"Authorization": "Bearer key-one-and-more"}):
        assert anon.get("/v1/models", headers=headers).status_code == 401


@pytest.mark.parametrize("key", KEYS)
def test_every_key_accepted_as_bearer_or_x_api_key(anon, key):
    assert anon.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert anon.get("/v1/models", headers={"x-api-key": key}).status_code == 200


def test_keys_compared_in_constant_time(monkeypatch):
    """Every key is compared, with hmac.compare_digest, on equal-length digests, whichever matches."""
    import hmac

    from aphrodite.endpoints.openai import auth
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)
    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    digests = [auth.key_digest(k) for k in ("a", "much-longer-key", "k3")]
    for presented, ok in ((b"a", True), (b"k3", True), (b"much-longer-key", True), (b"nope", False),
                          (b"a" * 1000, False)):
        calls.clear()
        assert auth.key_matches(presented, digests) is ok
        assert calls == [(32, 32)] * 3


def test_open_routes_and_cors_preflight(anon):
    for path in ("/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs"):
        assert anon.get(path).status_code == 200, path
    assert anon.post("/ping").status_code == 200
    r = anon.options("/v1/chat/completions", headers={"Origin": "http://example.com",
                                                      "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.com")


def test_openai_client_with_key_and_served_names(auth_server):
    import openai
    client = openai.OpenAI(base_url=auth_server.base_url, api_key="key-two", max_retries=0)
    assert [m.id for m in client.models.list().data] == list(NAMES)
    for name in NAMES:
        assert client.completions.create(model=name, prompt="Hi", max_tokens=2).model == name
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=auth_server.base_url, api_key="EMPTY", max_retries=0).models.list()


def test_body_over_limit_gets_413(anon):
    headers = {"Authorization": "Bearer key-one"}
    big = {"model": "smol", "prompt": "x" * (BODY_LIMIT + 10)}
    r = anon.post("/v1/completions", json=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "smol", "prompt": "'
        for _ in range(70):
            yield b"x" * 1000
        yield b'"}'
    r = anon.post("/v1/completions", content=chunked(), headers={**headers, "content-type": "application/json"})
    assert r.status_code == 413
    assert anon.post("/v1/completions", json=_ok_body(), headers=headers).status_code == 200


def test_full_queue_gets_503_with_retry_after(auth_server, keyed):
    """2 sequences run and 2 wait (--max-num-seqs 2 --max-waiting-requests 2); a fifth waits nowhere."""
    body = {"model": "smol", "prompt": "Tell me a story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ready = threading.Barrier(5)
    stop = threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:  # a stream that stays open until told to go
        try:
            with keyed.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                ready.wait(120)
                stop.wait(120)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
            ready.abort()

    holders = [threading.Thread(target=hold) for _ in range(4)]
    for t in holders:
        t.start()
    try:
        ready.wait(120)
        r = keyed.post("/v1/completions", json={"model": "smol", "prompt": "one more", "max_tokens": 2})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy" and "capacity" in r.json()["error"]["message"]
        m = auth_server.wait_metrics(lambda m: m["aphrodite:num_requests_running"] == 2
                                     and m["aphrodite:num_requests_waiting"] == 2)
        assert m["aphrodite:num_requests_running"] == 2 and m["aphrodite:num_requests_waiting"] == 2
    finally:
        stop.set()
        for t in holders:
            t.join(60)
    assert not errors, errors
    assert _idle(auth_server.wait_metrics(_idle))
    # More sequences than the server ever admits is the request's fault: a 400, not a retry.
    r = keyed.post("/v1/completions", json={"model": "smol", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = keyed.post("/v1/chat/completions", json={"model": "smol", "messages": [{"role": "user", "content": "hi"}],
                                                 "n": 3, "max_tokens": 2})
    assert r.status_code == 400 and "max_num_seqs (2)" in r.json()["error"]["message"]
    assert keyed.post("/v1/completions", json={"model": "smol", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_openapi_describes_the_server(auth_server, keyed):
    from aphrodite.config import default_model_path
    from aphrodite.tokenization.tokenizer import get_tokenizer
    schema = keyed.get("/openapi.json").json()
    assert '"422"' not in str(schema).replace("'", '"') and "HTTPValidationError" not in str(schema)
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"}
    paths = schema["paths"]
    for path, item in paths.items():
        for method, op in item.items():
            open_route = path in ("/health", "/ping", "/version", "/metrics")
            assert ("security" in op) != open_route, (path, method)
            if method == "post" and not open_route:
                err = op["responses"]["400"]["content"]["application/json"]["schema"]
                assert err == {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/health", "/ping"):
        assert "content" not in paths[path]["get"]["responses"]["200"]  # empty body
        r = keyed.get(path)
        assert r.status_code == 200 and r.content == b""
    assert paths["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}
    assert keyed.get("/metrics").headers["content-type"].startswith("text/plain")
    r = keyed.options("/ping")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    assert set(paths["/ping"]) == {"get", "post"}
    assert paths["/v1/completions"]["post"]["responses"]["200"]["content"].keys() == {"application/json",
                                                                                      "text/event-stream"}
    # Start-up limits and the ranges SamplingParams enforces.
    schemas = schema["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == 2 and completion["logprobs"]["maximum"] == 20
    assert completion["top_p"]["exclusiveMinimum"] == 0 and completion["top_p"]["maximum"] == 1
    assert completion["temperature"]["minimum"] == 0
    assert schemas["ChatCompletionRequest"]["properties"]["chat_template"] is False  # not trusted here
    vocab = len(get_tokenizer(default_model_path()))
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == vocab - 1
    assert keyed.post("/detokenize", json={"tokens": [vocab - 1]}).status_code == 200
    assert keyed.post("/detokenize", json={"tokens": [vocab]}).status_code == 400


def test_schemathesis_finds_nothing(auth_server):
    """Schema-driven requests to every route with every check: status codes, content types, headers and
    bodies as documented, schema-valid requests accepted, schema-violating ones refused, auth enforced."""
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{auth_server.url}/openapi.json",
           "--checks", "all", "--phases", "fuzzing", "-n", "30", "--seed", "20", "--no-shrink",
           "-H", f"Authorization: Bearer {KEY}", "--request-timeout", "30"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m and int(m.group(1)) >= 150 and m.group(1) == m.group(2), out[-3000:]
    assert "Tested: 12" in out  # every route: probes, models, completions, chat, (de)tokenize with and without /v1
    print(f"schemathesis: {m.group(1)} cases in {took:.0f} s")


def test_request_templates_refused_unless_trusted(anon):
    """A template sent with a request is code: refused unless the server runs with --trust-request-chat-template."""
    messages = [{"role": "user", "content": "hi"}]
    for path, body in (("/v1/chat/completions", {"model": "smol", "messages": messages, "chat_template": "{{ 1 }}"}),
                       ("/tokenize", {"messages": messages, "chat_template": "{{ 1 }}"})):
        r = anon.post(path, json=body, headers={"x-api-key": "key-one"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]


def test_ctrl_c_shuts_down_cleanly(auth_server):
    """Last in this file: it stops the server, with a stream open that outlasts the drain
    (--shutdown-timeout 1) and so ends with an error event."""
    body = {"model": "smol", "prompt": "Write", "max_tokens": 400, "ignore_eos": True, "stream": True}
    events, codes = [], []
    with httpx.Client(base_url=auth_server.url, timeout=60, headers={"x-api-key": "key-one"}) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            stopper = None
            for line in r.iter_lines():
                if line:
                    events.append(line)
                if stopper is None:
                    stopper = threading.Thread(target=lambda: codes.append(auth_server.stop()))
                    stopper.start()
    stopper.join(60)
    assert codes == [0]
    assert events[-1] == "data: [DONE]" and "shut down" in json.loads(events[-2][len("data: "):])["error"]["message"]
    log = auth_server.log_tail(400)
    assert "Shutting down" in log and "Traceback" not in log
    for key in KEYS:  # keys are never logged
        assert key not in log
    assert "Received request" not in log  # nor requests, unless --enable-log-requests
    assert "KV cache capacity: 1024 tokens" in log and "http://127.0.0.1:" in log

