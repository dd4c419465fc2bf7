"""Server flags for LoRA, in process: ``--lora-modules`` forms, routes off unless switched on."""
from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest

from aphrodite.endpoints.openai.api_server import add_server_args, build_app
from aphrodite.endpoints.openai.serving_lora import LoRAModulePath
from aphrodite.engine.async_engine import AsyncLLMEngine
from aphrodite.engine_args import EngineArgs


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return parser.parse_args(list(argv))


def test_lora_modules_forms() -> None:
    args = _parse("--lora-modules", "a=/x/a", '{"name": "b", "path": "org/b", "base_model_name": "base"}')
    assert args.lora_modules == [LoRAModulePath("a", "/x/a"), LoRAModulePath("b", "org/b", "base")]
    for bad in ("no-equals", '{"name": "c"}', '{"name": "c", "path": "p", "rank": 4}'):
        with pytest.raises(SystemExit):
            _parse("--lora-modules", bad)


def _engine(path: str, **kwargs) -> AsyncLLMEngine:
    args = EngineArgs(model=path, skip_tokenizer_init=True, max_model_len=64, num_gpu_blocks_override=16, **kwargs)
    return AsyncLLMEngine.from_engine_args(args, start=False)


@pytest.mark.parametrize("env", [None, "1"])
def test_runtime_routes_need_the_switch(tiny_llama_dir, lora_dirs, monkeypatch, env) -> None:
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    if env is None:
        monkeypatch.delenv("APHRODITE_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    else:
        monkeypatch.setenv("APHRODITE_ALLOW_RUNTIME_LORA_UPDATING", env)
    engine = _engine(tiny_llama_dir, enable_lora=True)
    app = build_app(engine, _parse("--lora-modules", f"sql={lora_dirs['sql']}"))
    engine.start()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            models = await c.get("/v1/models")
            unload = await c.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
            return models, unload
    try:
        models, unload = asyncio.run(go())
    finally:
        engine.shutdown()
    assert [m["id"] for m in models.json()["data"]] == [tiny_llama_dir, "sql"]
    assert unload.status_code == (404 if env is None else 200)


def test_lora_modules_need_enable_lora(tiny_llama_dir, lora_dirs) -> None:
    engine = _engine(tiny_llama_dir)
    with pytest.raises(ValueError, match="--enable-lora"):
        build_app(engine, _parse("--lora-modules", f"sql={lora_dirs['sql']}"))
