"""``aphrodite run -tp 2`` serves exactly what one rank serves; when a worker dies, the server
answers errors (OpenAI error bodies, 5xx) instead of hanging, and reports itself unhealthy."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess  # tests/ is on sys.path (rootdir conftest)

from aphrodite import LLM, SamplingParams

ARGS = ["--device", "cpu", "--max-model-len", "128", "--num-gpu-blocks-override", "32", "--disable-log-requests"]
PROMPTS = [[5, 6, 7, 8], list(range(20, 61)), [9] * 17]


def test_tp2_server_matches_one_rank_then_fails_cleanly(tiny_llama_dir: str, default_gguf_path: str) -> None:
    # The tiny model has no tokenizer of its own; the default model's decodes its small ids.
    server = ServerProcess([tiny_llama_dir, "--tokenizer", default_gguf_path, "-tp", "2", *ARGS])
    try:
        server.wait_ready()
        llm = LLM(tiny_llama_dir, tokenizer=default_gguf_path, device="cpu", max_model_len=128)
        want = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1), use_tqdm=False)
        model = httpx.get(f"{server.base_url}/models", timeout=30).json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "logprobs": 1}
        r = httpx.post(f"{server.base_url}/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        for c, w in zip(choices, want):
            assert c["text"] == w.outputs[0].text
            got_lps = c["logprobs"]["token_logprobs"]
            want_lps = [d[t].logprob for d, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)]
            assert got_lps == pytest.approx(want_lps, abs=1e-4)

        workers = [pid for pid in _descendants(server.proc.pid)
                   if "spawn_main" in _cmdline(pid) and "resource_tracker" not in _cmdline(pid)]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        body["max_tokens"] = 50
        r = httpx.post(f"{server.base_url}/completions", json=body, timeout=30)
        assert r.status_code in (500, 503), r.text
        assert "died" in r.json()["error"]["message"]
        for _ in range(2):   # afterwards: refused at once, and the health check says so
            r = httpx.post(f"{server.base_url}/completions", json=body, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        for pid in workers:
            assert not _alive(pid)
    finally:
        server.stop()


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
