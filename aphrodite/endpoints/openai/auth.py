"""API-key checks, as plain ASGI middleware so streaming responses pass through untouched.

With keys configured, every ``/v1/*`` and ``/api/*`` route needs ``Authorization: Bearer KEY``
or ``x-api-key: KEY``; ``/health``, ``/version`` and ``/metrics`` stay open, and CORS preflight
(``OPTIONS``) passes. Keys are compared in constant time and never logged.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from typing import Any

from fastapi import Request

from aphrodite.endpoints.openai.errors import OpenAIError, error_body

__all__ = ["APIKeyMiddleware", "key_matches", "require_admin"]

_PROTECTED_PREFIXES = ("/v1", "/api")


def _presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                bearer = token.strip()
        elif name == b"x-api-key":
            api_key = value.strip()
    return bearer if bearer is not None else api_key


def key_matches(presented: bytes | None, keys: list[bytes]) -> bool:
    """Constant-time check against every key (no early exit that would leak which one matched)."""
    if presented is None:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key)
    return ok


def _protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in _PROTECTED_PREFIXES)


class APIKeyMiddleware:
    def __init__(self, app: Any, api_keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] == "OPTIONS" or not self.keys
                or not _protected(scope["path"])):
            await self.app(scope, receive, send)
            return
        if key_matches(_presented_key(scope["headers"]), self.keys):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body("Invalid or missing API key. Send it as 'Authorization: Bearer KEY'.", 401,
                                     code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def require_admin(request: Request) -> None:
    """FastAPI dependency for admin routes (adapter and model load/unload): needs the admin key."""
    admin_key: str | None = getattr(request.app.state, "admin_key", None)
    if not admin_key:
        raise OpenAIError("Admin routes are disabled: start the server with --admin-key.", 403)
    if not key_matches(_presented_key(request.scope["headers"]), [admin_key.encode()]):
        raise OpenAIError("Invalid or missing admin key.", 401, code="invalid_api_key")
