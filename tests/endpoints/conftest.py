"""Real servers for the endpoint tests: ``aphrodite run`` in subprocesses on free ports.

Two servers start together, once per session (their start-ups overlap): the main one with the
default model, no auth, request chat templates trusted and requests logged; and one with API
keys (flags and APHRODITE_API_KEY), two served names, a small body limit, room for only 2 running
and 2 waiting sequences, and a 1 s drain on shutdown. Each runs torch on one thread: on a small
shared CPU, two threads per process fight over the cores and every step slows down many times over.
"""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server_process import ServerProcess  # tests/ is on sys.path (rootdir conftest)

MODEL = "SmolLM2-135M-Instruct"
AUTH_KEYS = ("key-one", "key-two")
ENV_KEY = "env-key"
AUTH_NAMES = ("smol", "other-name")
AUTH_BODY_LIMIT = 65536
_START_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def _servers() -> Iterator[dict[str, ServerProcess]]:
    main = ServerProcess(["--max-model-len", "2048", "--num-gpu-blocks-override", "512",
                          "--trust-request-chat-template", "--enable-log-requests", "--max-log-len", "40"])
    auth = ServerProcess(["--max-model-len", "512", "--num-gpu-blocks-override", "64", "--api-keys", *AUTH_KEYS,
                          "--served-model-name", *AUTH_NAMES, "--max-request-body-bytes", str(AUTH_BODY_LIMIT),
                          "--disable-log-requests", "--shutdown-timeout", "1", "--max-num-seqs", "2",
                          "--max-waiting-requests", "2"], env={"APHRODITE_API_KEY": ENV_KEY})
    servers = {"main": main, "auth": auth}
    try:
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="session")
def server(_servers: dict[str, ServerProcess]) -> ServerProcess:
    """The default model, no auth, max_model_len 2048, request templates trusted, requests logged (40 chars)."""
    return _servers["main"].wait_ready()


@pytest.fixture(scope="session")
def auth_server(_servers: dict[str, ServerProcess]) -> ServerProcess:
    """API keys on, served as two names, max_model_len 512, 64 KiB body limit, 2 running + 2 waiting sequences."""
    return _servers["auth"].wait_ready()


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    from openai import OpenAI
    return OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
