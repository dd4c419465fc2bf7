"""``aphrodite run-batch --enable-lora --lora-modules NAME=PATH``: a line's ``model`` names an adapter, as
on the server; checked against peft's greedy tokens for the same adapter (and the base model)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch

PROMPT = [5, 17, 42, 7, 99, 3]
MAX_TOKENS = 6


def _peft_greedy(peft_model, base: str, adapter: str | None) -> list[int]:
    with torch.inference_mode():
        out = peft_model(base, adapter).generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS,
                                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def test_run_batch_serves_lora_modules_by_name(tiny_llama_dir, lora_dirs, peft_model, tmp_path: Path) -> None:
    from aphrodite.endpoints.cli import build_parser
    from aphrodite.endpoints.openai.api_server import engine_args_from
    from aphrodite.endpoints.run_batch import run_batch
    from aphrodite.engine.async_engine import AsyncLLMEngine
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0, "ignore_eos": True}
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/completions", "body": {**body, "model": model}}
             for name, model in (("base", tiny_llama_dir), ("sql", "sql"), ("unknown", "poet"))]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = build_parser("run-batch").parse_args([
        "run-batch", "-i", str(src), "-o", str(dst), "--model", tiny_llama_dir, "--skip-tokenizer-init",
        "--enable-lora", "--max-lora-rank", "4", "--max-model-len", "64", "--num-gpu-blocks-override", "32",
        "--lora-modules", f"sql={lora_dirs['sql']}"])
    engine = AsyncLLMEngine.from_engine_args(engine_args_from(args), start=False, usage_context="llm")
    try:
        assert asyncio.run(run_batch(engine, args)) == (3, 2)
    finally:
        engine.shutdown()
    base, sql, unknown = [json.loads(x) for x in dst.read_text().splitlines()]

    def tokens(out: dict) -> list[int]:
        return [int(t.removeprefix("token_id:")) for t in out["response"]["body"]["choices"][0]["logprobs"]["tokens"]]
    assert tokens(base) == _peft_greedy(peft_model, tiny_llama_dir, None)
    assert tokens(sql) == _peft_greedy(peft_model, tiny_llama_dir, lora_dirs["sql"])
    assert sql["response"]["body"]["model"] == "sql" and tokens(sql) != tokens(base)
    assert unknown["response"]["status_code"] == 404 and unknown["error"]["error"]["code"] == "model_not_found"
