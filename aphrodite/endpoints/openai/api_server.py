"""The OpenAI-compatible HTTP server: the FastAPI app, its command-line flags, and ``run_server``.

``aphrodite run`` and ``aphrodite yaml`` build one argparse namespace (engine arguments plus the
flags of ``add_server_args``) and call ``run_server`` with it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from aphrodite.endpoints.openai.auth import APIKeyMiddleware
from aphrodite.endpoints.openai.errors import OpenAIError, error_body, error_response
from aphrodite.endpoints.openai.protocol import (  # module level: FastAPI resolves the route annotations here
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    ModelPermission,
    TokenizeRequest,
)

if TYPE_CHECKING:  # the engine imports torch: loaded only once a server is built, so `run -h` stays quick
    from aphrodite.engine.async_engine import AsyncLLMEngine
    from aphrodite.engine_args import EngineArgs

logger = logging.getLogger("aphrodite.endpoints.openai.api_server")

__all__ = ["add_server_args", "build_app", "run_server"]

DEFAULT_PORT = 2242
DEFAULT_MAX_BODY_BYTES = 16 << 20
_SERVER_DEFAULTS: dict[str, Any] = {}  # filled by add_server_args: flag dest -> default


# ---- command line ----------------------------------------------------------------------
def add_server_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add the server's own flags to ``parser`` (or an argument group of it); the engine's come from
    ``EngineArgs.add_cli_args``."""
    g = parser

    def add(*names: str, **kwargs: Any) -> None:
        action = g.add_argument(*names, **kwargs)
        _SERVER_DEFAULTS[action.dest] = action.default

    add("--host", default="0.0.0.0", help="Address to listen on. (default: 0.0.0.0, every interface)")
    add("--port", type=int, default=DEFAULT_PORT, help=f"Port to listen on. (default: {DEFAULT_PORT})")
    add("--api-keys", nargs="+", default=None, metavar="KEY",
        help="Require one of these keys on /v1/* and /api/* (Authorization: Bearer KEY or x-api-key). "
             "APHRODITE_API_KEY in the environment adds one. (default: no auth)")
    add("--admin-key", default=None, metavar="KEY",
        help="Key for admin routes (adapter and model load/unload); APHRODITE_ADMIN_KEY also sets it. "
             "(default: admin routes disabled)")
    add("--served-model-name", nargs="+", default=None, metavar="NAME",
        help="Name(s) clients use in the model field; the first appears in metrics. (default: the model)")
    add("--chat-template", default=None, metavar="FILE|URL|JINJA",
        help="Chat template for /v1/chat/completions: a file, an http(s) URL, or inline Jinja. "
             "(default: the tokenizer's)")
    add("--response-role", default="assistant", help="Role of generated chat messages. (default: assistant)")
    add("--max-log-len", type=int, default=None, metavar="N",
        help="Log at most N prompt characters and token ids per request. (default: unlimited)")
    add("--disable-log-requests", action="store_true", default=False, help="Do not log each request.")
    add("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="Log level of uvicorn. (default: info)")
    add("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, a JSON list. (default: ["*"])')
    add("--allowed-methods", type=json.loads, default=["*"], help='CORS methods, a JSON list. (default: ["*"])')
    add("--allowed-headers", type=json.loads, default=["*"], help='CORS headers, a JSON list. (default: ["*"])')
    add("--allow-credentials", action="store_true", default=False, help="CORS: allow credentials.")
    add("--lora-modules", nargs="+", default=None, metavar="NAME=PATH", type=_lora_module,
        help="LoRA adapters to serve (with --enable-lora): name=path, or JSON "
             '{"name": ..., "path": ..., "base_model_name": ...}; path is a PEFT directory or hub id. '
             "(default: none)")
    add("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="BYTES",
        help=f"Refuse request bodies larger than this with 413. (default: {DEFAULT_MAX_BODY_BYTES})")


def _lora_module(value: str) -> Any:
    from aphrodite.endpoints.openai.serving_lora import parse_lora_module
    return parse_lora_module(value)


def _opt(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, _SERVER_DEFAULTS.get(name))


# ---- the app -----------------------------------------------------------------------------
def build_app(engine: AsyncLLMEngine, args: argparse.Namespace, chat_template: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; ``args`` carries the flags of ``add_server_args``."""
    from aphrodite.endpoints.openai.metrics import ServerMetrics, log_stats_periodically
    from aphrodite.endpoints.openai.serving_chat import ChatServing
    from aphrodite.endpoints.openai.serving_common import ServingContext, new_id
    from aphrodite.endpoints.openai.serving_completions import CompletionServing
    from aphrodite.endpoints.openai.serving_lora import add_lora_routes, runtime_updates_allowed
    from aphrodite.endpoints.openai.serving_tokenize import detokenize, tokenize
    if not _SERVER_DEFAULTS:
        add_server_args(argparse.ArgumentParser())
    cfg = engine.config
    names = list(_opt(args, "served_model_name") or [cfg.model.model])
    ctx = ServingContext(engine, names, chat_template=chat_template, response_role=_opt(args, "response_role"),
                         log_requests=not _opt(args, "disable_log_requests"), max_log_len=_opt(args, "max_log_len"),
                         metrics=ServerMetrics(engine, names[0]))
    completions, chat = CompletionServing(ctx), ChatServing(ctx)
    _setup_loras(engine, ctx, _opt(args, "lora_modules") or [])
    log_stats = not getattr(args, "disable_log_stats", False)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(log_stats_periodically(engine)) if log_stats else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(title="Aphrodite OpenAI-compatible API", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.admin_key = _opt(args, "admin_key") or os.environ.get("APHRODITE_ADMIN_KEY") or None
    _add_error_handlers(app)

    # Middleware: the last added runs first. CORS -> API keys -> body size limit -> JSON body -> routes.
    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=_opt(args, "max_request_body_bytes"))
    keys = list(_opt(args, "api_keys") or [])
    if os.environ.get("APHRODITE_API_KEY"):
        keys.append(os.environ["APHRODITE_API_KEY"])
    if keys:
        app.add_middleware(APIKeyMiddleware, api_keys=keys)
    app.add_middleware(CORSMiddleware, allow_origins=_opt(args, "allowed_origins"),
                       allow_methods=_opt(args, "allowed_methods"), allow_headers=_opt(args, "allowed_headers"),
                       allow_credentials=_opt(args, "allow_credentials"))

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return Response(status_code=200)
        return error_response(OpenAIError("The engine is not running.", HTTPStatus.SERVICE_UNAVAILABLE))

    @app.get("/ping")
    @app.post("/ping")
    async def ping() -> Response:  # vLLM's (SageMaker's) name for /health
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        from aphrodite import __version__
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, root=cfg.model.path, max_model_len=ctx.max_model_len,
                      permission=[ModelPermission(id=new_id("modelperm"))]) for name in names]
            + ctx.loras.model_cards())

    if getattr(cfg, "lora", None) is not None and runtime_updates_allowed():
        add_lora_routes(app, ctx)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        _warn_ignored(request)
        return await completions.create(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        _warn_ignored(request)
        return await chat.create(request, raw_request)

    # vLLM serves these at the root (/tokenize); Aphrodite under /v1. Both answer.
    @app.post("/tokenize", response_model_exclude_none=True)
    @app.post("/v1/tokenize", response_model_exclude_none=True)
    async def tokenize_route(request: TokenizeRequest) -> Any:
        return tokenize(ctx, request)

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize_route(request: DetokenizeRequest) -> Any:
        return detokenize(ctx, request)

    return app


def _setup_loras(engine: AsyncLLMEngine, ctx: Any, modules: list[Any]) -> None:
    """Load the ``--lora-modules`` adapters (before the engine thread starts); ValueError if one cannot be."""
    if not modules:
        return
    if getattr(engine.config, "lora", None) is None:
        raise ValueError("--lora-modules needs --enable-lora.")
    if engine.is_running:
        raise ValueError("--lora-modules are loaded before the engine starts.")
    for request in ctx.loras.startup_requests(modules):
        engine.engine.add_lora(request)
        ctx.loras.add_loaded(request)


def _warn_ignored(request: Any) -> None:
    ignored = request.ignored_fields()
    if ignored:
        logger.warning("Ignoring unsupported request fields: %s", ", ".join(ignored))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def on_openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 in its own shape; OpenAI clients expect a 400 with an error body.
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return error_response(OpenAIError(f"The request body is not valid JSON: {detail}".rstrip(": ")))
        parts = []
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        loc = [x for x in first.get("loc", ()) if x != "body"]
        param = str(loc[0]) if loc else None
        return error_response(OpenAIError("Invalid request: " + "; ".join(parts), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(OpenAIError(str(e.detail), e.status_code), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("Unhandled error")
        return error_response(OpenAIError(f"Internal server error: {type(e).__name__}: {e}",
                                          HTTPStatus.INTERNAL_SERVER_ERROR))


class JSONBodyMiddleware:
    """Reads a POST body as JSON whatever its declared type: ``curl -d '{...}'`` sends
    ``application/x-www-form-urlencoded``, which FastAPI would hand over as raw bytes (a 400)."""

    _AS_SENT = (b"application/json", b"multipart/")  # JSON already, or a real form upload

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = next((v for k, v in scope["headers"] if k == b"content-type"), b"").lower()
            if not (declared.startswith(self._AS_SENT) or b"+json" in declared):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length up front, or by counting a chunked body."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps(error_body(f"The request body is larger than the limit of {self.max_bytes} bytes.",
                                     HTTPStatus.REQUEST_ENTITY_TOO_LARGE, code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        seen = 0
        rejected = False

        async def counting_receive() -> Any:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request" and not rejected:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    rejected = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded_send(message: Any) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)


# ---- running it ---------------------------------------------------------------------------
def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    """The ``EngineArgs`` named in ``args`` (engine flags use argparse.SUPPRESS, so absent = default)."""
    from aphrodite.engine_args import EngineArgs
    values = {name: getattr(args, name) for name in EngineArgs.field_names() if hasattr(args, name)}
    model_tag = getattr(args, "model_tag", None)
    if model_tag is not None:
        if values.get("model") not in (None, model_tag):
            raise ValueError(f"Two models given: {model_tag!r} and --model {values['model']!r}.")
        values["model"] = model_tag
    return EngineArgs.from_dict(values)


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"Cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _sigterm_to_interrupt() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


def run_server(args: argparse.Namespace) -> None:
    """Load the engine, serve the OpenAI API until Ctrl-C (or SIGTERM), then shut down cleanly.

    Raises ``ValueError`` for bad arguments, a chat template that cannot be read, or a taken port.
    """
    import uvicorn

    from aphrodite.engine.async_engine import AsyncLLMEngine
    from aphrodite.tokenization.chat_template import load_chat_template
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    engine_args = engine_args_from(args)
    chat_template = load_chat_template(_opt(args, "chat_template"))
    host, port = _opt(args, "host"), _opt(args, "port")
    sock = _bind(host, port)
    _sigterm_to_interrupt()
    engine = None
    try:
        engine = AsyncLLMEngine.from_engine_args(engine_args, start=False)
        app = build_app(engine, args, chat_template)   # loads --lora-modules, so before the engine thread runs
        engine.start()
        cfg = engine.config
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        logger.info("Model: %s (%s), max_model_len %d", cfg.model.model, cfg.model.path, cfg.scheduler.max_model_len)
        logger.info("KV cache capacity: %d tokens (%d blocks of %d)", cfg.cache.num_blocks * cfg.cache.block_size,
                    cfg.cache.num_blocks, cfg.cache.block_size)
        logger.info("Serving %s at http://%s:%d (OpenAI base URL http://%s:%d/v1)%s",
                    ", ".join(app.state.ctx.served_model_names), shown, sock.getsockname()[1], shown,
                    sock.getsockname()[1], "; API keys required" if _auth_on(args) else "")
        config = uvicorn.Config(app, log_level=_opt(args, "uvicorn_log_level"), timeout_keep_alive=5,
                                timeout_graceful_shutdown=5)
        asyncio.run(_uvicorn_server(config, engine).serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("Shutting down")
        if engine is not None:
            engine.shutdown()
        sock.close()


def _uvicorn_server(config: Any, engine: AsyncLLMEngine) -> Any:
    """uvicorn's server, stopping the engine first on exit: streams still open then end at once with an
    error event, instead of holding the shutdown until uvicorn's grace period runs out."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            await super().shutdown(sockets)

    return Server(config)


def _auth_on(args: argparse.Namespace) -> bool:
    return bool(_opt(args, "api_keys") or os.environ.get("APHRODITE_API_KEY"))
