"""A server with no tokenizer and dummy weights (only a config.json), as the GPU serve benchmark runs
the Llama-3.1-8B shape: token-id prompts are served, every step that makes tokens is streamed as
its own chunk (empty text), usage counts the tokens, and ``bench serve`` times it like any model."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess

from aphrodite.endpoints.cli import main


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = tmp_path_factory.mktemp("config_only")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
              "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}
    (model_dir / "config.json").write_text(json.dumps(config))
    s = ServerProcess([str(model_dir), "--load-format", "dummy", "--skip-tokenizer-init", "--max-model-len", "128",
                       "--num-gpu-blocks-override", "64", "--disable-log-requests", "--uvicorn-log-level", "warning"])
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def _model(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/models", timeout=30).json()["data"][0]["id"]


def _stream(server: ServerProcess, prompt: list[int], max_tokens: int) -> list[dict]:
    body = {"model": _model(server), "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]


def test_token_prompt_streams_chunks_without_text(bare_server: ServerProcess) -> None:
    counts = []
    for k in range(3):
        events = _stream(bare_server, [5 + k, 6, 7, 8], 16)
        token_chunks = [e for e in events if e["choices"]]
        assert all(e["choices"][0]["text"] == "" for e in token_chunks)
        assert [e["choices"][0]["finish_reason"] for e in token_chunks][-1] == "length"
        assert events[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}
        counts.append(len(token_chunks))
    # A chunk per step that made tokens (a reader slower than the engine gets several in one);
    # chunks with no text used to be dropped, leaving one chunk per request.
    assert all(c <= 16 for c in counts) and max(counts) > 1, counts


def test_text_prompt_needs_a_tokenizer(bare_server: ServerProcess) -> None:
    r = httpx.post(f"{bare_server.base_url}/completions", timeout=30,
                   json={"model": _model(bare_server), "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 400 and "skip_tokenizer_init" in r.json()["error"]["message"]


def test_bench_serve_times_every_token(bare_server: ServerProcess, capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    path = tmp_path / "bare.json"
    argv = ["bench", "serve", "--base-url", bare_server.url, "--num-prompts", "6", "--random-input-len", "16",
            "--random-output-len", "8", "--request-rate", "50", "--disable-tqdm", "--save-detailed",
            "--result-filename", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "did not report its vocabulary size" not in out  # the probe read the vocab from the error
    assert re.search(r"^Total generated tokens:\s+48\s*$", out, re.M), out
    result = json.loads(path.read_text())
    assert result["completed"] == 6 and result["output_lens"] == [8] * 6
    assert all(len(itl) <= 7 for itl in result["itls"]) and sum(map(len, result["itls"])) > 0
    assert result["mean_tpot_ms"] > 0 and result["mean_itl_ms"] > 0
