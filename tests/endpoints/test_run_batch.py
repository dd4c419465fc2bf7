"""``aphrodite run-batch``: OpenAI Batch API files through the server's handlers, checked line by line
against ``LLM.generate`` / ``LLM.chat`` (the offline path) for the same greedy requests."""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

MODEL = "SmolLM2-135M-Instruct"
ENGINE_FLAGS = ["--max-model-len", "256", "--num-gpu-blocks-override", "32"]
MAX_TOKENS = 12
CHATS = {"chat-france": [{"role": "user", "content": "What is the capital of France?"}],
         "chat-system": [{"role": "system", "content": "You answer in one word."},
                         {"role": "user", "content": "Name a colour."}]}
PROMPTS = {"cmpl-once": "Once upon a time", "cmpl-robot": "A robot may hurt a human if"}


def _line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _batch_lines() -> list[str]:
    """Chat and completion lines interleaved with lines that must fail, each for its own reason."""
    greedy = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    chats = [_line(cid, "/v1/chat/completions", {**greedy, "messages": m}) for cid, m in CHATS.items()]
    prompts = [_line(cid, "/v1/completions", {**greedy, "prompt": p}) for cid, p in PROMPTS.items()]
    return [
        chats[0], prompts[0],
        '{"custom_id": "broken", "method": "POST", "url": ',                                       # not JSON
        _line("bad-temperature", "/v1/completions", {**greedy, "prompt": "x", "temperature": "hot"}),
        chats[1],
        _line("bad-model", "/v1/chat/completions", {**greedy, "model": "nope", "messages": CHATS["chat-france"]}),
        _line("bad-url", "/v1/embeddings", {"model": MODEL, "input": "x"}),
        _line("streamed", "/v1/completions", {**greedy, "prompt": "x", "stream": True}),
        "",                                                                                         # skipped
        prompts[1],
    ]


EXPECTED_IDS = ["chat-france", "cmpl-once", None, "bad-temperature", "chat-system", "bad-model", "bad-url", "streamed",
                "cmpl-robot"]


@pytest.fixture(scope="module")
def offline() -> dict[str, tuple[str, int, str]]:
    """custom_id -> (text, completion tokens, finish reason) from ``LLM`` for the same requests."""
    import torch

    from aphrodite import LLM, SamplingParams
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(max_model_len=256, num_gpu_blocks_override=32)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        outs = llm.generate(list(PROMPTS.values()), params, use_tqdm=False)
        outs += llm.chat(list(CHATS.values()), params, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    return {cid: (o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason)
            for cid, o in zip([*PROMPTS, *CHATS], outs)}


def _check_outputs(lines: list[dict], offline: dict[str, tuple[str, int, str]], expected_ids: list) -> None:
    assert [o["custom_id"] for o in lines] == expected_ids
    for out in lines:
        assert out["id"].startswith("vllm-") and out["response"]["request_id"].startswith("vllm-batch-")
        cid, response = out["custom_id"], out["response"]
        if cid in offline:
            text, n_tokens, reason = offline[cid]
            assert response["status_code"] == 200 and out["error"] is None, out
            body = response["body"]
            choice = body["choices"][0]
            got = choice["message"]["content"] if cid.startswith("chat") else choice["text"]
            assert body["object"] == ("chat.completion" if cid.startswith("chat") else "text_completion")
            assert body["model"] == MODEL
            assert (got, body["usage"]["completion_tokens"], choice["finish_reason"]) == (text, n_tokens, reason)
            if cid.startswith("chat"):
                assert choice["message"]["role"] == "assistant"
            continue
        assert response["body"] is None
        if cid == "bad-temperature":  # the server's own 400, with OpenAI's error body
            assert response["status_code"] == 400
            assert out["error"]["error"]["param"] == "temperature"
            assert out["error"]["error"]["type"] == "invalid_request_error"
        elif cid == "bad-model":
            assert response["status_code"] == 404 and out["error"]["error"]["code"] == "model_not_found"
        elif cid == "bad-url":
            assert response["status_code"] == 400 and "/v1/embeddings" in out["error"]
        elif cid == "streamed":
            assert response["status_code"] == 400 and "stream" in out["error"]
        else:
            assert cid is None and response["status_code"] == 400 and "not valid JSON" in out["error"]


def test_run_batch_matches_llm_and_runs_requests_together(tmp_path: Path, offline) -> None:
    """In-process, with the CLI's own parser: every line answered in input order, the good ones equal
    to ``LLM``; the engine sees several of the requests at once (the batch is not run one by one)."""
    import torch

    from aphrodite.endpoints.cli import build_parser
    from aphrodite.endpoints.openai.api_server import engine_args_from
    from aphrodite.endpoints.run_batch import run_batch
    from aphrodite.engine.async_engine import AsyncLLMEngine
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(_batch_lines()) + "\n", encoding="utf-8-sig")  # with a BOM, as Windows tools write
    args = build_parser("run-batch").parse_args(["run-batch", "-i", str(src), "-o", str(dst), *ENGINE_FLAGS])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncLLMEngine.from_engine_args(engine_args_from(args), usage_context="llm")
    try:
        async def run_and_watch() -> tuple[tuple[int, int], int]:
            most = 0

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, engine.stats.num_running + engine.stats.num_waiting)
                    await asyncio.sleep(0.005)

            watcher = asyncio.ensure_future(watch())
            try:
                return await run_batch(engine, args), most
            finally:
                watcher.cancel()

        (total, ok), most_in_flight = asyncio.run(run_and_watch())
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    assert (total, ok) == (len(EXPECTED_IDS), len(offline))
    assert most_in_flight >= 3, most_in_flight
    _check_outputs([json.loads(x) for x in dst.read_text().splitlines()], offline, EXPECTED_IDS)


def test_run_batch_cli_stdin_to_stdout(offline) -> None:
    """``aphrodite run-batch -i - -o -`` as a user runs it: stdout holds the output lines and nothing else."""
    lines = _batch_lines()
    chosen = [lines[1], lines[2], lines[4]]  # a completion, a broken line, a chat
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("APHRODITE_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "aphrodite.endpoints.cli", "run-batch", "-i", "-", "-o", "-",
                           *ENGINE_FLAGS], input="\n".join(chosen) + "\n", capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs([json.loads(x) for x in proc.stdout.splitlines()], offline, ["cmpl-once", None, "chat-system"])


def test_run_batch_bad_input_or_output_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from aphrodite.endpoints.cli import main
    assert main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    # an input URL is fetched before the model loads, so a bad one fails at once
    assert main(["run-batch", "-i", "http://127.0.0.1:9/in.jsonl", "-o", str(tmp_path / "out.jsonl")]) == 1
    assert "Cannot read the batch input http://127.0.0.1:9/in.jsonl" in capsys.readouterr().err
    assert main(["run-batch", "-i", "-", "-o", str(tmp_path / "no" / "out.jsonl")]) == 1
    assert "folder of the batch output" in capsys.readouterr().err


class _Files(http.server.BaseHTTPRequestHandler):
    """GET serves ``files[path]``; PUT stores the body there (what a signed upload URL does)."""

    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        data = self.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.end_headers()
        self.wfile.write(data or b"")

    def do_PUT(self) -> None:  # noqa: N802
        self.files[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_run_batch_reads_and_uploads_over_http(tmp_path: Path, offline, monkeypatch) -> None:
    """Input from an http URL (GET, read as the batch runs), output PUT to one through a file in
    --output-tmp-dir; then a whole ``aphrodite run-batch`` from one URL to another."""
    from aphrodite.endpoints.cli import main
    from aphrodite.endpoints.run_batch import OrderedWriter, open_output, read_lines
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _Files.files["/in.jsonl"] = b'{"a": 1}\n\n{"b": 2}\n'
        assert list(read_lines(f"{base}/in.jsonl")) == ['{"a": 1}', '{"b": 2}']
        with pytest.raises(ValueError, match="Cannot read"):
            list(read_lines(f"{base}/missing.jsonl"))
        with open_output(f"{base}/out.jsonl", str(tmp_path)) as out:
            writer = OrderedWriter(out)
            writer.add(1, {"custom_id": "second"})
            assert list(tmp_path.iterdir())  # written locally first
            writer.add(0, {"custom_id": "first"})
        assert not list(tmp_path.iterdir())  # removed after the upload
        uploaded = [json.loads(x) for x in _Files.files["/out.jsonl"].decode().splitlines()]
        assert uploaded == [{"custom_id": "first"}, {"custom_id": "second"}]
        lines = _batch_lines()
        _Files.files["/batch.jsonl"] = "\n".join([lines[4], lines[2], lines[1]]).encode()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert main(["run-batch", "-i", f"{base}/batch.jsonl", "-o", f"{base}/result.jsonl", *ENGINE_FLAGS]) == 0
        _check_outputs([json.loads(x) for x in _Files.files["/result.jsonl"].decode().splitlines()], offline,
                       ["chat-system", None, "cmpl-once"])
    finally:
        server.shutdown()
        server.server_close()


class _CountingOut:
    """An output stream that counts the lines written so far."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines += text.splitlines()

    def flush(self) -> None:
        pass


def test_run_batch_reads_ahead_a_bounded_window_and_answers_n(monkeypatch) -> None:
    """A slow first line holds back the output of those after it: reading stops once a bounded number of
    lines wait (a file of any size runs in bounded memory), and every line still comes out, in order,
    with its own ids; a body with ``n`` = 2 gets its two choices."""
    import torch

    from aphrodite.endpoints import run_batch as rb
    from aphrodite.endpoints.cli import build_parser
    from aphrodite.endpoints.openai.api_server import engine_args_from
    from aphrodite.engine.async_engine import AsyncLLMEngine
    monkeypatch.setattr(rb, "_UNWRITTEN_PER_IN_FLIGHT", 1)
    args = build_parser("run-batch").parse_args(["run-batch", "-i", "-", "-o", "-", *ENGINE_FLAGS,
                                                 "--max-num-seqs", "2", "--enable-auto-tool-choice",
                                                 "--tool-call-parser", "hermes"])
    window = 2 * 2  # twice max_num_seqs in flight, times 1
    slow = _line("slow", "/v1/completions", {"model": MODEL, "prompt": "Count:", "max_tokens": 40,
                                             "ignore_eos": True, "temperature": 0})
    quick = [_line(f"q{i}", "/v1/completions", {"model": MODEL, "prompt": f"{i} +", "max_tokens": 1,
                                                "temperature": 1.0, "seed": i, "n": 2 if i == 3 else 1})
             for i in range(20)]
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    quick[7] = _line("q7", "/v1/chat/completions", {"model": MODEL, "max_tokens": 1, "tools": [tool],
                                                    "messages": [{"role": "user", "content": "Time?"}]})
    out = _CountingOut()
    ahead: list[int] = []

    def source():
        for i, line in enumerate([slow, *quick]):
            ahead.append(i + 1 - len(out.lines))  # read, not yet written
            yield line

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncLLMEngine.from_engine_args(engine_args_from(args), start=False, usage_context="llm")
    try:
        total, ok = asyncio.run(rb.run_batch(engine, args, stdout=out, lines=source()))
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    assert (total, ok) == (21, 21)
    assert max(ahead) <= window, ahead
    results = [json.loads(x) for x in out.lines]
    assert [r["custom_id"] for r in results] == ["slow"] + [f"q{i}" for i in range(20)]
    assert len({r["id"] for r in results}) == 21 and len({r["response"]["request_id"] for r in results}) == 21
    assert results[0]["response"]["body"]["usage"]["completion_tokens"] == 40
    assert [c["index"] for c in results[4]["response"]["body"]["choices"]] == [0, 1]
    assert results[4]["response"]["body"]["usage"]["completion_tokens"] == 2
    assert results[8]["response"]["body"]["object"] == "chat.completion"  # tools, auto: the server's tool flags
