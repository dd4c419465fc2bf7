"""OpenAI-shaped errors: one exception type the handlers raise, one JSON body every error uses.

Every failure a client can cause ends as ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status, so OpenAI clients raise their usual typed exceptions.
"""
from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["RETRY_AFTER_S", "OpenAIError", "error_body", "error_response", "from_value_error"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
# "temperature must be ...", "messages[2] has unknown role ...": the field the message is about.
_LEADING_FIELD = re.compile(r"^([a-z_]+)(?:\[\d+\])?[\s:]")


class OpenAIError(Exception):
    """An error to send to the client as an OpenAI error body with ``status``."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers


def error_body(message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    err = OpenAIError(message, status, param=param, code=code, type=type)
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


RETRY_AFTER_S = 1  # what a 503 (queue full, draining, engine down) tells clients to wait before retrying


def error_response(err: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response of ``err``; every 503 carries ``Retry-After``."""
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    headers = {**(err.headers or {}), **(headers or {})}
    if err.status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse(body, status_code=err.status, headers=headers or None)


def from_value_error(e: ValueError, fields: set[str] | frozenset[str] = frozenset()) -> OpenAIError:
    """A 400 for an input the engine, ``SamplingParams`` or the chat template rejected.

    ``param`` names the request field the message starts with, when it is one of ``fields``.
    """
    message = str(e) or "Invalid request."
    m = _LEADING_FIELD.match(message)
    param = m.group(1) if m and m.group(1) in fields else None
    return OpenAIError(message, HTTPStatus.BAD_REQUEST, param=param)
