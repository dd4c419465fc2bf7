"""API keys (flag and APHRODITE_API_KEY), served names, the body size limit, and a clean Ctrl-C, on a
second server."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

KEYS = ("key-one", "key-two", "env-key")  # two from --api-keys, one from the environment
NAMES = ("smol", "other-name")
BODY_LIMIT = 4096


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

    def spy(a, b):
        calls.append((len(a), len(b)))
        return hmac.compare_digest(a, b)
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
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'
    r = anon.post("/v1/completions", content=chunked(), headers={**headers, "content-type": "application/json"})
    assert r.status_code == 413
    assert anon.post("/v1/completions", json=_ok_body(), headers=headers).status_code == 200


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
    assert "KV cache capacity: 1024 tokens" in log and "http://127.0.0.1:" in log

