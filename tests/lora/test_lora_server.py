"""LoRA over HTTP with the official ``openai`` client against a real ``aphrodite run`` server.

The server starts with one adapter (``--lora-modules``), one device slot, API keys, and runtime
updates on (vLLM's env switch): adapters are listed in /v1/models with their parent, a request names
one in ``model`` and gets peft's greedy tokens, load/unload change what is served, bad adapters are
400s, unknown names 404s, and two adapters' requests sent at once both finish (one waits for the slot).
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_process import ServerProcess  # tests/ is on sys.path (rootdir conftest)

KEY = "lora-key"
PROMPT = [11, 42, 99, 7, 180, 33, 5]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_llama_dir: str, lora_dirs: dict[str, str]):
    s = ServerProcess([tiny_llama_dir, "--skip-tokenizer-init", "--enable-lora", "--max-loras", "1",
                       "--max-lora-rank", "4", "--max-model-len", "128", "--num-gpu-blocks-override", "64",
                       "--lora-modules", f"sql={lora_dirs['sql']}", "--api-keys", KEY, "--disable-log-requests",
                       "--uvicorn-log-level", "warning"], env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def _greedy(client: openai.OpenAI, model: str) -> list[int]:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def _peft_greedy(peft_model, base: str, adapter: str | None) -> list[int]:
    with torch.inference_mode():
        out = peft_model(base, adapter).generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS,
                                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def _load(client: openai.OpenAI, name: str, path: str) -> str:
    return client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": path}, cast_to=httpx.Response).text


def test_models_lists_adapters_with_parent(client: openai.OpenAI, tiny_llama_dir: str) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {tiny_llama_dir, "sql"}
    assert models["sql"].parent == tiny_llama_dir


def test_adapter_by_model_name_matches_peft(client, tiny_llama_dir, lora_dirs, peft_model) -> None:
    assert _greedy(client, "sql") == _peft_greedy(peft_model, tiny_llama_dir, lora_dirs["sql"])
    assert _greedy(client, tiny_llama_dir) == _peft_greedy(peft_model, tiny_llama_dir, None)
    with pytest.raises(openai.NotFoundError) as e:
        _greedy(client, "no-such-adapter")
    assert e.value.code == "model_not_found"


def test_load_unload_at_run_time(client, server, tiny_llama_dir, lora_dirs, peft_model, tmp_path: Path) -> None:
    copy = tmp_path / "sql_copy"
    shutil.copytree(lora_dirs["sql"], copy)
    assert _load(client, "sql-copy", str(copy)) == "Success: LoRA adapter 'sql-copy' added successfully."
    assert {m.id for m in client.models.list().data} == {tiny_llama_dir, "sql", "sql-copy"}
    # One device slot: the two adapters' requests take turns; none fails.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda m: _greedy(client, m), ["sql", "sql-copy", "sql", "sql-copy"]))
    assert results == [_peft_greedy(peft_model, tiny_llama_dir, lora_dirs["sql"])] * 4

    with pytest.raises(openai.BadRequestError, match="already been loaded"):
        _load(client, "sql-copy", str(copy))
    with pytest.raises(openai.BadRequestError, match="LoRA rank 8 of adapter 'poet' is greater than max_lora_rank 4"):
        _load(client, "poet", lora_dirs["poet"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(openai.BadRequestError, match="No adapter_config.json"):
        _load(client, "empty", str(tmp_path / "empty"))
    with pytest.raises(openai.BadRequestError, match="lora_name"):
        client.post("/load_lora_adapter", body={"lora_path": str(copy)}, cast_to=httpx.Response)

    out = client.post("/unload_lora_adapter", body={"lora_name": "sql-copy"}, cast_to=httpx.Response)
    assert out.text == "Success: LoRA adapter 'sql-copy' removed successfully."
    assert {m.id for m in client.models.list().data} == {tiny_llama_dir, "sql"}
    with pytest.raises(openai.NotFoundError):
        _greedy(client, "sql-copy")
    with pytest.raises(openai.NotFoundError, match="cannot be found"):
        client.post("/unload_lora_adapter", body={"lora_name": "sql-copy"}, cast_to=httpx.Response)


def test_load_route_needs_the_api_key(server: ServerProcess, lora_dirs) -> None:
    r = httpx.post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "x", "lora_path": lora_dirs["sql"]})
    assert r.status_code == 401
