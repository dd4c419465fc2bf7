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
import time
import warnings
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from aphrodite.endpoints.openai.auth import APIKeyMiddleware, is_protected
from aphrodite.endpoints.openai.bodies import json_body, warn_ignored
from aphrodite.endpoints.openai.errors import RETRY_AFTER_S, OpenAIError, error_body, error_response
from aphrodite.endpoints.openai.protocol import (  # module level: FastAPI resolves the route annotations here
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    TokenizeRequest,
    TokenizeResponse,
)
from aphrodite.endpoints.openai.tools import add_tool_args, tool_options
from aphrodite.tokenization.chat_template import REQUEST_TEMPLATE_BUDGET_S

if TYPE_CHECKING:  # the engine imports torch: loaded only once a server is built, so `run -h` stays quick
    from aphrodite.engine.async_engine import AsyncLLMEngine
    from aphrodite.engine_args import EngineArgs

logger = logging.getLogger("aphrodite.endpoints.openai.api_server")

__all__ = ["add_server_args", "build_app", "run_server"]

DEFAULT_PORT = 2242
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_WAITING = 1024
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
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
    add("--launch-kobold-api", action="store_true", default=False,
        help="Also serve the KoboldAI API (/api/v1/generate, /api/extra/generate/stream, ...) on this port.")
    add("--chat-template", default=None, metavar="FILE|URL|JINJA",
        help="Chat template for /v1/chat/completions: a file, an http(s) URL, or inline Jinja. "
             "(default: the tokenizer's)")
    add("--response-role", default="assistant", help="Role of generated chat messages. (default: assistant)")
    add("--trust-request-chat-template", action="store_true", default=False,
        help="Accept a chat_template sent with a request (chat and tokenize). Without it such requests get a "
             f"400; with it each renders within a {REQUEST_TEMPLATE_BUDGET_S:g} s budget.")
    add("--enable-log-requests", action="store_true", default=False,
        help="Log each request (prompt, parameters, token ids) at INFO.")
    add("--max-log-len", type=int, default=None, metavar="N",
        help="With --enable-log-requests: log at most N prompt characters and token ids. (default: unlimited)")
    add("--disable-log-requests", action="store_true", default=False,
        help="Deprecated: requests are not logged unless --enable-log-requests.")
    add("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
        help="Sequences that may wait for a slot beyond the max_num_seqs that run; more get 503 with Retry-After.")
    add("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
        help="On SIGTERM/SIGINT, refuse new requests (503) and let those in flight finish for up to this long; "
             "then abort the rest and exit. 0 aborts at once; a second signal too.")
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
    add_tool_args(add)


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
                         log_requests=_opt(args, "enable_log_requests"), max_log_len=_opt(args, "max_log_len"),
                         metrics=ServerMetrics(engine, names[0]),
                         trust_request_chat_template=_opt(args, "trust_request_chat_template"))
    completions, chat = CompletionServing(ctx), ChatServing(ctx, **tool_options(args, _opt))
    _setup_loras(engine, ctx, _opt(args, "lora_modules") or [])
    log_stats = not getattr(args, "disable_log_stats", False)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.ensure_future(log_stats_periodically(engine)) if log_stats else None
        yield
        if task is not None:
            task.cancel()
        ctx.workers.shutdown()

    app = FastAPI(title="Aphrodite OpenAI-compatible API", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.admin_key = _opt(args, "admin_key") or os.environ.get("APHRODITE_ADMIN_KEY") or None
    app.state.lifecycle = lifecycle = Lifecycle()
    _add_error_handlers(app)

    # Middleware: the last added runs first. Drain -> CORS -> API keys -> body size limit -> JSON body -> routes.
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
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)

    @app.api_route("/health", methods=["GET"], response_class=Response, responses=_PROBE_RESPONSES)
    async def health() -> Response:
        """200 with an empty body while the engine runs; 503 once it has stopped."""
        if engine.is_running:
            return Response(status_code=200)
        return error_response(OpenAIError("The engine is not running.", HTTPStatus.SERVICE_UNAVAILABLE))

    # vLLM's (SageMaker's) name for /health; one route for both methods, so OPTIONS lists both.
    @app.api_route("/ping", methods=["GET", "POST"], response_class=Response, responses=_PROBE_RESPONSES)
    async def ping() -> Response:
        return await health()

    @app.get("/version", responses={200: {"content": {"application/json": {"schema": {
        "type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}}}}}})
    async def version() -> dict[str, str]:
        from aphrodite import __version__
        return {"version": __version__}

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, root=cfg.model.path, max_model_len=ctx.max_model_len,
                      permission=[ModelPermission(id=new_id("modelperm"))]) for name in names]
            + ctx.loras.model_cards())

    if getattr(cfg, "lora", None) is not None and runtime_updates_allowed():
        add_lora_routes(app, ctx)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_work_responses(streams=True),
              openapi_extra=_body_doc(CompletionRequest))
    async def create_completion(request: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
                                raw_request: Request) -> Response:
        warn_ignored(request)
        return await completions.create(request, raw_request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_work_responses(streams=True),
              openapi_extra=_body_doc(ChatCompletionRequest))
    async def create_chat_completion(
            request: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
            raw_request: Request) -> Response:
        warn_ignored(request)
        return await chat.create(request, raw_request)

    # vLLM serves these at the root (/tokenize); Aphrodite under /v1. Both answer.
    for prefix in ("", "/v1"):
        @app.post(f"{prefix}/tokenize", response_model=TokenizeResponse, responses=_work_responses(),
                  openapi_extra=_body_doc(TokenizeRequest))
        async def tokenize_route(request: Annotated[TokenizeRequest, Depends(json_body(TokenizeRequest))]) -> Response:
            return await tokenize(ctx, request)

        @app.post(f"{prefix}/detokenize", response_model=DetokenizeResponse, responses=_work_responses(),
                  openapi_extra=_body_doc(DetokenizeRequest))
        async def detokenize_route(
                request: Annotated[DetokenizeRequest, Depends(json_body(DetokenizeRequest))]) -> DetokenizeResponse:
            return await detokenize(ctx, request)

    if _opt(args, "launch_kobold_api"):
        from aphrodite.endpoints.kobold.api import add_kobold_routes
        add_kobold_routes(app, ctx, protected=bool(keys))
    from aphrodite.endpoints.web import add_web_routes
    add_web_routes(app)  # the chat page, at /chat and /

    vocab_size = len(ctx.tokenizer) if ctx.tokenizer is not None else None

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            with warnings.catch_warnings():  # /ping: one route, two methods; describe_server names them apart
                warnings.filterwarnings("ignore", message="Duplicate Operation ID ping_")
                base = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = describe_server(
                base, auth=bool(keys),
                max_num_seqs=ctx.max_num_seqs, max_logprobs=ctx.max_logprobs, vocab_size=vocab_size,
                trust_request_chat_template=ctx.trust_request_chat_template)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ---- request bodies -----------------------------------------------------------------------------
_BODY_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads it with ``json_body`` (FastAPI sees no body parameter)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


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


# ---- the OpenAPI schema: what the server really answers -----------------------------------------
def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                          "schema": {"type": "integer"}}}
    return out


_UNAVAILABLE = _error("The engine is not running, the server is shutting down, or (for generation) too many "
                      "sequences wait already.", retry_after=True)
_PROBE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The server is up (empty body)."}, 503: _UNAVAILABLE}


def _work_responses(streams: bool = False) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        400: _error("Invalid request: malformed JSON, wrong types, values out of range, a prompt over the context."),
        404: _error("The model is not served here."),
        413: _error("The request body is over --max-request-body-bytes."),
        503: _UNAVAILABLE}
    if streams:
        out[200] = {"description": "The response; with stream=true, server-sent events ending in 'data: [DONE]'.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return out


def describe_server(schema: dict[str, Any], *, auth: bool, max_num_seqs: int, max_logprobs: int,
                    vocab_size: int | None, trust_request_chat_template: bool) -> dict[str, Any]:
    """FastAPI's schema, made to match the server: validation errors are 400s with OpenAI's error body
    (FastAPI documents 422), limits known only at start-up, the API-key scheme when keys are set, and
    request templates absent unless accepted."""
    from pydantic.json_schema import models_json_schema
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, bodies = models_json_schema([(m, "validation") for m in _BODY_MODELS],
                                   ref_template="#/components/schemas/{model}")
    schemas.update(bodies["$defs"])
    seen_ids: set[str] = set()
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            op.get("responses", {}).pop("422", None)
            if op.get("operationId") in seen_ids:  # one route with two methods (/ping)
                op["operationId"] = f"{op['operationId']}_{method}"
            seen_ids.add(op.get("operationId"))
            if auth and is_protected(path):
                op["security"] = [{"bearerAuth": []}, {"apiKeyAuth": []}]
                op["responses"]["401"] = {"description": "Missing or wrong API key.", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    if auth:
        schema["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
            "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
    limits = {"n": max_num_seqs, "best_of": max_num_seqs, "logprobs": max_logprobs, "top_logprobs": max_logprobs,
              "prompt_logprobs": max_logprobs}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas.get(name, {}).get("properties", {})
        for field, maximum in limits.items():
            if field in props and not (name == "ChatCompletionRequest" and field == "logprobs"):
                props[field]["maximum"] = maximum
    for name in ("ChatCompletionRequest", "TokenizeRequest"):
        props = schemas.get(name, {}).get("properties", {})
        if not trust_request_chat_template and "chat_template" in props:
            props["chat_template"] = False  # refused: the property may not appear
    if vocab_size is not None and "DetokenizeRequest" in schemas:
        schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] = vocab_size - 1
    return schema


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


class Lifecycle:
    """Requests in flight and whether the server is draining (graceful shutdown): shared by the drain
    middleware, which counts and refuses, and the uvicorn server, which decides when to stop."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.drain_started: float | None = None

    @property
    def draining(self) -> bool:
        return self.drain_started is not None

    def start_drain(self) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()


class DrainMiddleware:
    """Counts HTTP requests until their response (a stream too) has ended; while draining, answers every
    new request 503 (with Retry-After), so load balancers move on and clients retry elsewhere."""

    def __init__(self, app: Any, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            body = json.dumps(error_body("The server is shutting down.", HTTPStatus.SERVICE_UNAVAILABLE)).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


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
        engine = AsyncLLMEngine.from_engine_args(engine_args, start=False,
                                                 max_waiting_requests=_opt(args, "max_waiting_requests"))
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
        logger.info("Web chat at http://%s:%d/chat%s", shown, sock.getsockname()[1],
                    "; KoboldAI API under /api/v1 and /api/extra" if _opt(args, "launch_kobold_api") else "")
        config = uvicorn.Config(app, log_level=_opt(args, "uvicorn_log_level"), timeout_keep_alive=5,
                                timeout_graceful_shutdown=5)
        server = _uvicorn_server(config, engine, app.state.lifecycle, _opt(args, "shutdown_timeout"))
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("Shutting down")
        if engine is not None:
            engine.shutdown()
        sock.close()


def _uvicorn_server(config: Any, engine: AsyncLLMEngine, lifecycle: Lifecycle, shutdown_timeout: float) -> Any:
    """uvicorn's server with a graceful shutdown: the first SIGTERM/SIGINT starts a drain (new requests
    get 503, those in flight go on) that ends when none is left or after ``shutdown_timeout`` seconds;
    then the engine stops, so streams still open end at once with an error event. A second signal
    ends the drain early."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if shutdown_timeout > 0 and not lifecycle.draining and not self.should_exit:
                self._captured_signals.append(sig)  # uvicorn raises them again once it has stopped
                lifecycle.start_drain()
                logger.info("Shutting down: refusing new requests, waiting up to %g s for %d in flight "
                            "(signal again to stop now)", shutdown_timeout, lifecycle.in_flight)
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if lifecycle.drain_started is not None and not self.should_exit:
                waited = time.monotonic() - lifecycle.drain_started
                if lifecycle.in_flight == 0 or waited >= shutdown_timeout:
                    self.should_exit = True
            return await super().on_tick(counter)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            lifecycle.start_drain()
            if lifecycle.in_flight:
                logger.warning("Aborting %d requests still in flight", lifecycle.in_flight)
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            await super().shutdown(sockets)

    return Server(config)


def _auth_on(args: argparse.Namespace) -> bool:
    return bool(_opt(args, "api_keys") or os.environ.get("APHRODITE_API_KEY"))
