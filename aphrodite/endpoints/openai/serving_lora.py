"""LoRA adapters on the server, with vLLM's flags, routes and bodies.

* ``--lora-modules name=path [...]`` (or JSON: ``{"name": ..., "path": ..., "base_model_name": ...}``)
  loads adapters at start-up; each is then a model name clients can put in ``model``.
* ``/v1/models`` lists them after the base model, with ``parent`` = the base model's name.
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter``
  ``{"lora_name"}`` change them at run time. Like vLLM these routes exist only with ``--enable-lora``
  and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` (or ``APHRODITE_ALLOW_RUNTIME_LORA_UPDATING=1``); they sit
  under ``/v1``, so API keys guard them like every other route.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from aphrodite.endpoints.openai.errors import OpenAIError
from aphrodite.endpoints.openai.protocol import ModelCard, ModelPermission
from aphrodite.lora.request import LoRARequest

if TYPE_CHECKING:
    from aphrodite.endpoints.openai.serving_common import ServingContext
    from aphrodite.engine.async_engine import AsyncLLMEngine

__all__ = ["LoRAModulePath", "LoRARegistry", "LoadLoRAAdapterRequest", "UnloadLoRAAdapterRequest",
           "add_lora_routes", "parse_lora_module", "runtime_updates_allowed"]

RUNTIME_ENV_VARS = ("APHRODITE_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def runtime_updates_allowed() -> bool:
    """vLLM's switch (or ours) for the load/unload routes: ``1`` or ``true``."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in RUNTIME_ENV_VARS)


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModulePath:
    """argparse type of ``--lora-modules`` entries: ``name=path`` or a JSON object."""
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON in --lora-modules entry: {e}") from None
        if not isinstance(data, dict) or not data.get("name") or not data.get("path"):
            raise argparse.ArgumentTypeError('a JSON --lora-modules entry needs "name" and "path"')
        unknown = set(data) - {"name", "path", "base_model_name"}
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown keys in --lora-modules entry: {', '.join(sorted(unknown))}")
        return LoRAModulePath(str(data["name"]), str(data["path"]), data.get("base_model_name"))
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules entries are name=path or JSON, got {value!r}")
    return LoRAModulePath(name, path)


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str | None = None
    lora_int_id: int | None = None


class LoRARegistry:
    """The adapters clients can name, by name; ids are handed out in order from 1."""

    def __init__(self, engine: AsyncLLMEngine, base_model_name: str) -> None:
        self.engine = engine
        self.base_model_name = base_model_name
        self.by_name: dict[str, LoRARequest] = {}
        self._next_id = 1
        self._lock = asyncio.Lock()

    def _new(self, name: str, path: str, base: str | None = None) -> LoRARequest:
        request = LoRARequest(name, self._next_id, path, base)
        self._next_id += 1
        return request

    def add_loaded(self, request: LoRARequest) -> None:
        """Record an adapter the engine already holds (the start-up modules)."""
        self.by_name[request.lora_name] = request
        self._next_id = max(self._next_id, request.lora_int_id + 1)

    def startup_requests(self, modules: list[LoRAModulePath]) -> list[LoRARequest]:
        return [self._new(m.name, m.path, m.base_model_name) for m in modules]

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        if not body.lora_name or not body.lora_path:
            raise OpenAIError("Both 'lora_name' and 'lora_path' must be provided.")
        async with self._lock:
            known = self.by_name.get(body.lora_name)
            if known is not None and not body.load_inplace:
                raise OpenAIError(f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
            request = self._new(body.lora_name, body.lora_path)
            try:
                await self.engine.add_lora(request)
            except ValueError as e:
                raise OpenAIError(str(e), param="lora_path") from None
            if known is not None:   # load_inplace: the new weights replace the old under the same name
                await self.engine.remove_lora(known.lora_int_id)
            self.by_name[body.lora_name] = request
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        if not body.lora_name:
            raise OpenAIError("'lora_name' needs to be provided to unload a LoRA adapter.")
        async with self._lock:
            request = self.by_name.get(body.lora_name)
            if request is None or (body.lora_int_id is not None and body.lora_int_id != request.lora_int_id):
                raise OpenAIError(f"The lora adapter '{body.lora_name}' cannot be found.", HTTPStatus.NOT_FOUND,
                                  param="lora_name", code="model_not_found", type="NotFoundError")
            del self.by_name[body.lora_name]
            await self.engine.remove_lora(request.lora_int_id)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    def model_cards(self) -> list[ModelCard]:
        from aphrodite.endpoints.openai.serving_common import new_id
        return [ModelCard(id=r.lora_name, root=r.lora_path, parent=r.base_model_name or self.base_model_name,
                          permission=[ModelPermission(id=new_id("modelperm"))]) for r in self.by_name.values()]


def add_lora_routes(app: FastAPI, ctx: ServingContext) -> None:
    """vLLM's runtime load/unload routes (the caller decides whether they are on)."""
    registry = ctx.loras

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(await registry.load(request))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(await registry.unload(request))
