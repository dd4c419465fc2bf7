"""The web chat page: one self-contained HTML file (no external scripts, styles or fonts) that talks to
this server's ``/v1/models`` and ``/v1/chat/completions``, served at ``/chat`` and ``/`` (where Aphrodite
serves its web UI). The page is static and takes no input, so it is open even with ``--api-keys``: the
key is typed into the page, which sends it with each API call."""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

__all__ = ["CHAT_PATHS", "add_web_routes", "chat_page"]

CHAT_PATHS = ("/chat", "/")
# The page may reach this server only, and runs only its own inline script and style.
_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def chat_page() -> bytes:
    """The chat page's HTML, from the installed package."""
    return resources.files(__package__).joinpath("chat.html").read_bytes()


def add_web_routes(app: FastAPI) -> None:
    """Serve the chat page at ``CHAT_PATHS`` (left out of the OpenAPI schema: it is not an API)."""
    page = chat_page()

    async def chat() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    for path in CHAT_PATHS:
        app.add_api_route(path, chat, methods=["GET"], include_in_schema=False)
