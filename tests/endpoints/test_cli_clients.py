"""``aphrodite chat`` / ``aphrodite complete`` as a user runs them, against the real test servers; each
reply is checked against the official ``openai`` client's answer to the same greedy request."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MODEL = "SmolLM2-135M-Instruct"
AUTH_KEYS = ("key-one", "key-two")  # the auth server's --api-keys and --served-model-name (conftest.py)
AUTH_NAMES = ("smol", "other-name")

GREEDY = ["--temperature", "0", "--max-tokens", "16"]


def _cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    full_env.update({"PYTHONPATH": str(Path(__file__).resolve().parents[2]), **(env or {})})
    return subprocess.run([sys.executable, "-m", "aphrodite.endpoints.cli", *args], input=stdin, text=True,
                          capture_output=True, env=full_env, timeout=120)


def test_complete_quick_streams_the_greedy_completion(server, client) -> None:
    """No --model: the server's first model; stdout is the completion and a newline, nothing else."""
    proc = _cli("complete", "--url", server.base_url, "-q", "Once upon a time", *GREEDY)
    assert proc.returncode == 0, proc.stderr
    want = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16)
    assert proc.stdout == want.choices[0].text + "\n"
    assert f"Using model: {MODEL}" in proc.stderr


def test_chat_keeps_the_conversation(server, client) -> None:
    """Two typed turns with a system prompt: the second reply is the one the whole history gives."""
    system = "You are a geography teacher who answers briefly."
    proc = _cli("chat", "--url", server.base_url, "--model", MODEL, "--system-prompt", system, *GREEDY,
                stdin="What is the capital of France?\n\nAnd of Germany?\n")  # a blank line is skipped
    assert proc.returncode == 0, proc.stderr
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"}]
    replies = []
    for follow_up in ("And of Germany?", None):
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                               max_tokens=16).choices[0].message.content
        replies.append(reply)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
    assert replies[0] != replies[1]
    assert proc.stdout == f"> {replies[0]}\n> > {replies[1]}\n> "  # input()'s prompts, then the streamed replies
    assert "httpx" not in proc.stderr  # no request log lines between the replies


def test_chat_quick_with_stats(server, client) -> None:
    proc = _cli("chat", "--url", server.url, "-q", "Name a colour.", "--stats", *GREEDY)  # host:port: /v1 added
    assert proc.returncode == 0, proc.stderr
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                           temperature=0, max_tokens=16)
    lines = proc.stdout.splitlines()
    assert "\n".join(lines[:-2]) == reply.choices[0].message.content
    assert lines[-2].startswith("TTFT: ") and lines[-2].endswith(" ms")
    assert f"({reply.usage.completion_tokens} tokens in " in lines[-1]


def test_api_key_flag_and_environment(auth_server) -> None:
    """--api-key, else OPENAI_API_KEY; a refused key is a one-line error and exit status 1."""
    args = ("complete", "--url", auth_server.base_url, "-q", "Hello", "--max-tokens", "2")
    ok = _cli(*args, env={"OPENAI_API_KEY": AUTH_KEYS[0]})
    assert ok.returncode == 0 and f"Using model: {AUTH_NAMES[0]}" in ok.stderr, ok.stderr
    assert _cli(*args, "--api-key", AUTH_KEYS[1], env={"OPENAI_API_KEY": "wrong"}).returncode == 0
    refused = _cli(*args, "--model", AUTH_NAMES[1])
    assert refused.returncode == 1 and "aphrodite: error:" in refused.stderr and "401" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_no_server_is_a_clear_error() -> None:
    proc = _cli("chat", "--url", "http://127.0.0.1:9/v1", "-q", "hi")
    assert proc.returncode == 1 and "cannot reach a server at http://127.0.0.1:9/v1" in proc.stderr


def test_complete_session_goes_on_after_a_refused_prompt(server, client) -> None:
    """A prompt longer than the context gets the server's 400 on stderr; the next line still completes."""
    too_long = "word " * 3000
    proc = _cli("complete", "--url", server.base_url, *GREEDY, stdin=f"{too_long}\nOnce upon a time\n")
    assert proc.returncode == 0, proc.stderr
    assert "error: the server answered 400" in proc.stderr and "maximum context length" in proc.stderr
    want = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16)
    assert proc.stdout == f"> > {want.choices[0].text}\n> "
