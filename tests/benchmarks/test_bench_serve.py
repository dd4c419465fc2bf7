"""`aphrodite bench serve` against a real `aphrodite run` subprocess (the default model, API keys on):
the printed block parses, token counts are exact, the JSON holds the per-request lists, failed
requests are counted rather than fatal; plus the arrival times and prompt sampling alone."""
from __future__ import annotations

import argparse
import json
import math
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import ServerProcess

from aphrodite.benchmarks.serve import _sample_workload, arrival_times
from aphrodite.endpoints.cli import main

API_KEY = "bench-key"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 8, 16, 8
WORKLOAD = ["--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(INPUT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--disable-tqdm"]
BLOCK_ROWS = ("Successful requests:", "Failed requests:", "Benchmark duration (s):", "Total input tokens:",
              "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
              "Total Token throughput (tok/s):",
              *(f"{stat} {m} (ms):" for m in ("TTFT", "TPOT", "ITL") for stat in ("Mean", "Median", "P99")))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = ServerProcess(["--max-model-len", "512", "--num-gpu-blocks-override", "64", "--api-keys", API_KEY,
                "--disable-log-requests", "--uvicorn-log-level", "warning"])
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("APHRODITE_API_KEY", raising=False)


def _bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["bench", "serve", *argv]) == 0
    return capsys.readouterr().out


def _block(out: str) -> dict[str, float]:
    """The rows of the printed result block, label -> value; checks the frame lines too."""
    lines = out.splitlines()
    top = lines.index("============ Serving Benchmark Result ============")
    bottom = lines.index("=" * 50, top)
    body = lines[top + 1:bottom]
    for header in ("---------------Time to First Token----------------",
                   "-----Time per Output Token (excl. 1st token)------",
                   "---------------Inter-token Latency----------------"):
        assert header in body, out
    rows = {}
    for line in body:
        if not line.startswith("-"):
            label, value = line[:40].rstrip(), line[41:].strip()
            assert re.fullmatch(r"[0-9]+(\.[0-9]{2})?", value), line
            rows[label] = float(value)
    missing = [r for r in BLOCK_ROWS if r not in rows]
    assert not missing, out
    return rows


def _check_totals(rows: dict[str, float]) -> None:
    assert rows["Successful requests:"] == NUM_PROMPTS and rows["Failed requests:"] == 0
    assert rows["Total input tokens:"] == NUM_PROMPTS * INPUT_LEN
    assert rows["Total generated tokens:"] == NUM_PROMPTS * OUTPUT_LEN
    duration = rows["Benchmark duration (s):"]
    assert rows["Output token throughput (tok/s):"] == pytest.approx(NUM_PROMPTS * OUTPUT_LEN / duration, rel=0.02)
    for m in ("TTFT", "TPOT", "ITL"):
        assert 0 < rows[f"Mean {m} (ms):"] <= rows[f"P99 {m} (ms):"] * 1.0001 + 0.01


def test_rate_inf_with_detailed_json(server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "inf.json"
    out = _bench(["--base-url", server.url, "--api-key", API_KEY, *WORKLOAD, "--save-result", "--save-detailed",
                  "--result-filename", str(path)], capsys)
    rows = _block(out)
    _check_totals(rows)
    assert "Request rate configured (RPS):" not in rows and "Maximum request concurrency:" not in rows

    result = json.loads(path.read_text())
    assert result["completed"] == NUM_PROMPTS and result["request_rate"] == "inf"
    assert result["model_id"] == "SmolLM2-135M-Instruct"  # the server's first model
    assert result["input_lens"] == [INPUT_LEN] * NUM_PROMPTS
    assert result["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert result["errors"] == [""] * NUM_PROMPTS
    for key in ("ttfts", "itls", "latencies", "start_times", "generated_texts"):
        assert len(result[key]) == NUM_PROMPTS, key
    for ttft, itl, latency in zip(result["ttfts"], result["itls"], result["latencies"]):
        assert 1 <= len(itl) <= OUTPUT_LEN - 1  # a slow reader may get two tokens in one chunk
        assert 0 < ttft < latency == pytest.approx(ttft + sum(itl))
    assert result["mean_ttft_ms"] == pytest.approx(rows["Mean TTFT (ms):"], abs=0.01)
    assert result["p99_itl_ms"] == pytest.approx(rows["P99 ITL (ms):"], abs=0.01)


def test_poisson_rate_env_key_and_concurrency(server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("APHRODITE_API_KEY", API_KEY)
    path = tmp_path / "rate20.json"
    out = _bench(["--host", "127.0.0.1", "--port", str(server.port), *WORKLOAD, "--request-rate", "20",
                  "--max-concurrency", "4", "--temperature", "0", "--result-filename", str(path)], capsys)
    rows = _block(out)
    _check_totals(rows)
    assert rows["Request rate configured (RPS):"] == 20 and rows["Maximum request concurrency:"] == 4
    assert rows["Peak concurrent requests:"] <= 4
    result = json.loads(path.read_text())
    assert result["request_rate"] == 20 and result["max_concurrency"] == 4
    assert "ttfts" not in result and "itls" not in result  # per-request lists only with --save-detailed


def test_failed_requests_are_counted(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    out = _bench(["--base-url", server.url, "--api-key", API_KEY, "--model", "no-such-model", "--num-prompts", "3",
                  "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm"], capsys)
    assert "HTTP 404: The model `no-such-model` does not exist" in out
    lines = out.splitlines()
    assert re.search(r"^Successful requests:\s+0\s*$", out, re.M) and re.search(r"^Failed requests:\s+3\s*$", out, re.M)
    assert lines[-1] == "=" * 50


def test_wrong_key_and_no_server_are_errors(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--base-url", server.url, "--api-key", "wrong", *WORKLOAD]) == 1
    assert "401" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "serve", "--port", str(port), *WORKLOAD]) == 1
    assert "no server answers" in capsys.readouterr().err


def test_arrival_times() -> None:
    assert arrival_times(5, math.inf, 1.0, 0) == [0.0] * 5
    times = arrival_times(100, 10.0, 1.0, seed=3)
    assert times == arrival_times(100, 10.0, 1.0, seed=3) != arrival_times(100, 10.0, 1.0, seed=4)
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert times[-1] == pytest.approx(100 / 10.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    even = arrival_times(100, 10.0, 1000.0, seed=3)  # high burstiness: almost even spacing
    even_gaps = [b - a for a, b in zip(even, even[1:])]
    assert max(even_gaps) - min(even_gaps) < max(gaps) - min(gaps)


def test_workload_sampling() -> None:
    from aphrodite.benchmarks.common import random_token_prompts
    args = argparse.Namespace(num_prompts=6, random_input_len=10, random_output_len=5, random_range_ratio=0.0,
                              random_prefix_len=0, seed=7)
    w = _sample_workload(args, 1000)
    assert w.prompts == random_token_prompts(6, 10, 1000, 7)  # bench throughput's prompts for the same seed
    assert w.output_lens == [5] * 6
    args.random_range_ratio, args.random_prefix_len = 0.5, 3
    w = _sample_workload(args, 1000)
    assert all(3 + 5 <= len(p) <= 3 + 15 and p[:3] == w.prompts[0][:3] for p in w.prompts)
    assert all(2 <= n <= 8 for n in w.output_lens)
    assert all(100 <= t < 900 for p in w.prompts for t in p)
