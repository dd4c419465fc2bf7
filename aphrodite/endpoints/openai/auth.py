"""API-key checks, as plain ASGI middleware so streaming responses pass through untouched.

With keys configured, every route needs ``Authorization: Bearer KEY`` or ``x-api-key: KEY``
(``/v1/*``, the root ``/tokenize`` and ``/detokenize``, and any path not known yet), except the
probes and docs in ``OPEN_PATHS``; CORS preflight (``OPTIONS``) passes. Keys are compared in
constant time, against every key, and never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

from fastapi import Request

from aphrodite.endpoints.openai.errors import OpenAIError, error_body

__all__ = ["OPEN_PATHS", "APIKeyMiddleware", "is_protected", "key_digest", "key_matches", "require_admin"]

# KoboldCpp's discovery routes (GET, no input) are open as on KoboldCpp: KoboldAI Lite asks /api/v1/model
# before it sends any key, then learns from /api/extra/version ("protected": true) that it needs one.
_KOBOLD_INFO = ("/model", "/info/version", "/config/max_context_length", "/config/max_length")
# Probes, metrics, the API docs (as vLLM) and the chat page (the key is typed into it): they take no user input.
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect", "/redoc", "/chat", "/", "/api/extra/version",
                        "/api/extra/true_max_context_length",
                        *(prefix + path for prefix in ("/api/v1", "/api/latest") for path in _KOBOLD_INFO)})


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


def key_digest(key: str | bytes) -> bytes:
    """What keys are compared as: SHA-256 digests, all 32 bytes, so a comparison's time shows not even
    a key's length."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def key_matches(presented: bytes | None, key_digests: list[bytes]) -> bool:
    """Constant-time check against every key: ``hmac.compare_digest`` on each, no early exit that would
    tell which one matched."""
    if presented is None:
        return False
    digest = key_digest(presented)
    ok = False
    for key in key_digests:
        ok |= hmac.compare_digest(digest, key)
    return ok


def is_protected(path: str) -> bool:
    """Whether ``path`` needs a key when keys are set: everything but ``OPEN_PATHS``."""
    return path not in OPEN_PATHS


class APIKeyMiddleware:
    def __init__(self, app: Any, api_keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [key_digest(k) for k in api_keys]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] == "OPTIONS" or not self.keys
                or not is_protected(scope["path"])):
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
    if not key_matches(_presented_key(request.scope["headers"]), [key_digest(admin_key)]):
        raise OpenAIError("Invalid or missing admin key.", 401, code="invalid_api_key")
