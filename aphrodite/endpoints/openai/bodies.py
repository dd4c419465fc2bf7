"""Reading request bodies, shared by every JSON route (the OpenAI routes and the KoboldAI API).

It imports no engine code, so ``api_server`` (and ``aphrodite run -h``) stays light.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from aphrodite.endpoints.openai.errors import OpenAIError

__all__ = ["json_body", "warn_ignored"]

logger = logging.getLogger("aphrodite.endpoints.openai.api_server")

_INLINE_BODY_BYTES = 256 << 10  # smaller bodies are parsed on the event loop: a thread hop would cost more


def json_body(model: type[BaseModel]) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that reads the body as ``model``: parsed and validated from the raw JSON bytes by
    pydantic, on a worker thread when it is big (a million token ids take a second of validation).
    Errors reach the same handler as FastAPI's own, so they are OpenAI-shaped 400s."""
    async def parse(request: Request) -> Any:
        try:
            body = await request.body()
        except ClientDisconnect:  # gone, or cut off by the body size limit (which has answered already)
            raise OpenAIError("The request body ended early.") from None
        try:
            if len(body) < _INLINE_BODY_BYTES:
                return model.model_validate_json(body)
            return await request.app.state.ctx.workers.run(model.model_validate_json, body)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
    return parse


def warn_ignored(request: Any) -> None:
    """Log the fields of ``request`` (an ``OpenAIRequestModel``) that the server accepts but does not use."""
    ignored = request.ignored_fields()
    if ignored:  # names come from the client: quoted, cut short, and only a few, so logs stay readable
        shown = ", ".join(ascii(name[:40]) for name in ignored[:5])
        logger.warning("Ignoring unsupported request fields: %s%s", shown, ", ..." if len(ignored) > 5 else "")
