"""`aphrodite bench throughput|latency` end to end on a tiny random Llama: the printed lines
parse, token counts are exact, and the HF baseline runs the same workload."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aphrodite.endpoints.cli import main

FLOAT = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"
THROUGHPUT = re.compile(rf"^(HF baseline )?Throughput: {FLOAT} requests/s, {FLOAT} total tokens/s, "
                        rf"{FLOAT} output tokens/s$", re.M)
# Engine arguments that keep a CPU run of the tiny model small and quick.
TINY_ENGINE = ["--skip-tokenizer-init", "--max-model-len", "64", "--cpu-kvcache-space", "0.01", "--device", "cpu"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def _count(out: str, what: str, prefix: str = "") -> int:
    match = re.search(rf"^{prefix}Total num {what} tokens:\s+(\d+)$", out, re.M)
    assert match, out
    return int(match.group(1))


def test_throughput_with_hf_baseline(tiny_llama_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    num_prompts, input_len, output_len = 4, 8, 4
    out_json = tmp_path / "throughput.json"
    out = _run(["bench", "throughput", "--model", str(tiny_llama_dir), "--num-prompts", str(num_prompts),
                "--input-len", str(input_len), "--output-len", str(output_len), "--baseline", "hf",
                "--output-json", str(out_json), *TINY_ENGINE], capsys)

    assert re.search(rf"^Engine start-up: {FLOAT} s$", out, re.M), out
    rows = THROUGHPUT.findall(out)
    assert [r[0] for r in rows] == ["", "HF baseline "], out
    for _, req_s, total_s, out_s in rows:
        req_s, total_s, out_s = float(req_s), float(total_s), float(out_s)
        assert req_s > 0
        # Every request has the same lengths, so the three rates are in fixed proportion.
        assert total_s == pytest.approx(req_s * (input_len + output_len), rel=0.01, abs=0.02)
        assert out_s == pytest.approx(req_s * output_len, rel=0.01, abs=0.02)
    for prefix in ("", "HF baseline "):
        assert _count(out, "prompt", prefix) == num_prompts * input_len
        assert _count(out, "output", prefix) == num_prompts * output_len
    assert re.search(rf"^Speedup vs HF: {FLOAT}x$", out, re.M), out

    results = json.loads(out_json.read_text())
    assert results["num_requests"] == num_prompts
    assert results["total_num_tokens"] == num_prompts * (input_len + output_len)
    assert results["hf_baseline"]["total_output_tokens"] == num_prompts * output_len
    assert results["speedup_vs_hf"] > 0


def test_throughput_hf_subset_and_n(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--n samples per prompt; the HF baseline runs the first K prompts in batches of --hf-batch-size."""
    out = _run(["bench", "throughput", "--model", str(tiny_llama_dir), "--num-prompts", "3", "--input-len", "5",
                "--output-len", "3", "--n", "2", "--temperature", "0", "--baseline", "hf", "--hf-num-prompts", "2",
                "--hf-batch-size", "1", *TINY_ENGINE], capsys)
    assert _count(out, "prompt") == 3 * 5
    assert _count(out, "output") == 3 * 2 * 3
    assert _count(out, "prompt", "HF baseline ") == 2 * 5
    assert _count(out, "output", "HF baseline ") == 2 * 2 * 3


def test_latency_with_hf_baseline(tiny_llama_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    batch, input_len, output_len, iters = 2, 8, 4, 3
    out_json = tmp_path / "latency.json"
    out = _run(["bench", "latency", "--model", str(tiny_llama_dir), "--batch-size", str(batch),
                "--input-len", str(input_len), "--output-len", str(output_len), "--num-iters-warmup", "1",
                "--num-iters", str(iters), "--baseline", "hf", "--hf-num-iters", "2", "--hf-num-iters-warmup", "0",
                "--output-json", str(out_json), *TINY_ENGINE], capsys)

    for prefix in ("", "HF baseline "):
        avg = re.search(rf"^{prefix}Avg latency: {FLOAT} seconds$", out, re.M)
        assert avg, out
        for p in (10, 25, 50, 75, 90, 99):
            assert re.search(rf"^{prefix}{p}% percentile latency: {FLOAT} seconds$", out, re.M), out
        rate = re.search(rf"^{prefix}Output token throughput: {FLOAT} tokens/s$", out, re.M)
        per_token = re.search(rf"^{prefix}Time per output token: {FLOAT} ms$", out, re.M)
        assert rate and per_token, out
        avg_s = float(avg.group(1))
        assert float(rate.group(1)) == pytest.approx(batch * output_len / avg_s, rel=0.01)
        assert float(per_token.group(1)) == pytest.approx(avg_s * 1000 / output_len, rel=0.01)
    assert re.search(rf"^Speedup vs HF: {FLOAT}x$", out, re.M), out
    assert "WARNING" not in out

    results = json.loads(out_json.read_text())
    assert len(results["latencies"]) == iters
    assert results["output_tokens_per_iteration"] == batch * output_len
    assert len(results["hf_baseline"]["latencies"]) == 2
    assert results["hf_baseline"]["output_tokens_per_iteration"] == batch * output_len


def test_model_shapes_are_public_configs(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from aphrodite.benchmarks.model_shapes import write_model_shape
    from aphrodite.modeling.layers.rotary import get_rope_config
    llama = AutoConfig.from_pretrained(write_model_shape("llama-3.1-8b", tmp_path / "llama"))
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads, llama.num_key_value_heads,
            llama.intermediate_size, llama.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert not llama.tie_word_embeddings
    rope = get_rope_config(llama)
    assert (rope.rope_type, rope.theta, rope.factor, rope.original_max_position_embeddings) == \
        ("llama3", 500000.0, 8.0, 8192)
    smol = AutoConfig.from_pretrained(write_model_shape("smollm2-135m", tmp_path / "smol"))
    assert (smol.hidden_size, smol.num_hidden_layers, smol.num_attention_heads, smol.num_key_value_heads,
            smol.head_dim, smol.vocab_size) == (576, 30, 9, 3, 64, 49152)
    assert smol.tie_word_embeddings


def test_model_shape_excludes_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "latency", "--model-shape", "smollm2-135m", "--model", "x"]) == 1
    assert "--model-shape and --model are exclusive" in capsys.readouterr().err


def test_cli_help_runs_without_the_engine() -> None:
    """Parsing imports no torch: `aphrodite bench ... --help` answers at once."""
    code = ("import sys; from aphrodite.endpoints.cli import main\n"
            "try:\n    main(['bench', 'throughput', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'parsing imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--input-len", "--num-prompts", "--hf-batch-size", "--load-format", "--max-num-seqs",
                 "--model-shape"):
        assert flag in proc.stdout
