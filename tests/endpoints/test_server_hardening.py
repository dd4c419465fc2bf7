"""Requests logged only when asked, and a clear error without the server extra."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"


def test_requests_logged_when_asked_and_cut_to_max_log_len(server, http):
    """The main server runs with --enable-log-requests --max-log-len 40 (the auth server, without, logs none)."""
    prompt = "".join(f"{i:03d}" for i in range(60))  # 180 characters, each window of 40 distinct
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}).status_code == 200
    deadline = time.monotonic() + 10
    while prompt[:40] not in server.log_tail(2000) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log_tail(2000)
    assert f"prompt: {prompt[:40]!r}" in log and prompt[:41] not in log


def test_run_without_the_server_extra_says_what_to_install():
    """FastAPI and uvicorn made unimportable, as when aphrodite is installed without [server]."""
    code = """
import sys
class NoServer:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "starlette"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, NoServer())
from aphrodite.endpoints.cli import main
sys.exit(main(["run", "--host", "127.0.0.1", "--port", "2242"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert "pip install aphrodite[server]" in proc.stderr and "unrecognized" not in proc.stderr, proc.stderr
