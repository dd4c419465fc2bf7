"""``aphrodite run`` as a real subprocess for tests that talk to a server over HTTP."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

_START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``aphrodite run`` in a subprocess; its log goes to a temporary file shown on failure."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        keys = ("APHRODITE_API_KEY", "APHRODITE_ADMIN_KEY", "OPENAI_API_KEY")
        full_env = {k: v for k, v in os.environ.items() if k not in keys}
        full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
        self.log_path = Path(tempfile.mkstemp(prefix="aphrodite-server-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "aphrodite.endpoints.cli", "run", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=Path(__file__).resolve().parents[1])

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = _START_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Ctrl-C, as a user would; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: metric name -> value (labels dropped)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for m in re.finditer(r"^([a-zA-Z_:]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def wait_metrics(self, predicate, timeout: float = 15.0) -> dict[str, float]:
        """Poll /metrics until ``predicate(metrics)`` holds; returns the last metrics seen."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if predicate(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)
