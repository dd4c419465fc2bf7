"""The KoboldAI API routes (``--launch-kobold-api``), as Aphrodite serves them beside the OpenAI API.

``/api/v1`` (also ``/api/latest``) is KoboldAI United's API: generate, model, version, config values;
``/api/extra`` is KoboldCpp's: streaming, polling a generation by its ``genkey``, aborting it, token
counts. A generation is one engine request handled with the OpenAI routes' helpers (tokenization off
the event loop, admission limits, disconnects, metrics); its genkey names it for ``check`` and ``abort``
while it runs. Errors are the OpenAI routes' 400s with OpenAI's error body, as in Aphrodite.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from aphrodite.endpoints.kobold.protocol import KAIGenerationInputSchema, KAITokenizeRequest, kobold_field
from aphrodite.endpoints.openai.bodies import json_body, warn_ignored
from aphrodite.endpoints.openai.errors import OpenAIError
from aphrodite.endpoints.openai.metrics import RequestTimer
from aphrodite.endpoints.openai.protocol import ErrorResponse
from aphrodite.endpoints.openai.serving_common import (
    ChoiceCursor,
    ServingContext,
    SSEResponse,
    merge_streams,
    new_id,
    sse_error,
    stop_holdback,
    unless_disconnected,
)
from aphrodite.engine.async_engine import RequestStream
from aphrodite.outputs import RequestOutput
from aphrodite.sampling_params import SamplingParams

__all__ = ["KAI_VERSION", "KOBOLDCPP_VERSION", "KoboldServing", "add_kobold_routes"]

KAI_VERSION = "1.2.4"         # what Aphrodite answers on /api/v1/info/version (KoboldAI United's API)
KOBOLDCPP_VERSION = "1.63"    # and on /api/extra/version: clients then use the KoboldCpp extras
_FIELDS = frozenset(KAIGenerationInputSchema.model_fields)


class _Job:
    """A running generation under its genkey: the text so far (for ``check``) and its abort signal."""

    __slots__ = ("text", "abort")

    def __init__(self) -> None:
        self.text = ""
        self.abort = asyncio.Event()


class KoboldServing:
    """KoboldAI generation on the OpenAI routes' ``ServingContext``; running jobs by genkey."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.jobs: dict[str, list[_Job]] = {}  # a genkey may name several (clients that send a fixed one)
        self._badword_ids: list[int] | None = None

    async def badword_ids(self) -> list[int]:
        """KoboldAI's default banned tokens (``use_default_badwordsids``), as Aphrodite picks them: every
        token with a square bracket, but the pad token, and the EOS token. Found once."""
        if self._badword_ids is None:
            tok = self.ctx.need_tokenizer()

            def scan() -> list[int]:
                ids = {i for t, i in tok.get_vocab().items() if "[" in t or "]" in t}
                ids.discard(tok.pad_token_id)
                if tok.eos_token_id is not None:
                    ids.add(tok.eos_token_id)
                return sorted(ids)
            self._badword_ids = await self.ctx.workers.run(scan)
        return self._badword_ids

    # ---- a generation -------------------------------------------------------------------
    async def start(self, request: KAIGenerationInputSchema) -> tuple[str, _Job, RequestStream, SamplingParams,
                                                                         RequestTimer]:
        """Tokenize (keeping the last ``max_context_length - max_length`` tokens, as Kobold does), build the
        parameters, and hand the request to the engine under its genkey."""
        arrival = time.monotonic()
        ctx = self.ctx
        warn_ignored(request)
        client_context = ctx.max_model_len if request.max_context_length is None else request.max_context_length
        max_length = min(100, client_context) if request.max_length is None else request.max_length
        for name, value in (("max_length", max_length), ("max_context_length", client_context)):
            if value < 1:
                raise OpenAIError(f"{name} must be at least 1, got {value}.", param=name)
        if max_length > client_context:
            raise OpenAIError("max_length must not be larger than max_context_length.", param="max_length")
        ctx.check_num_seqs(request.n, None)
        # KoboldCpp's memory comes first (with the BOS token, if any) and stays; the prompt is cut to fit after it.
        memory = await ctx.encode(request.memory, whole=True) if request.memory else []
        prompt = await ctx.encode(request.prompt, add_special_tokens=not memory, whole=True)
        # A client's context may be larger than the model's: the model's is the limit (as KoboldCpp).
        budget = max(1, min(client_context, ctx.max_model_len) - max_length)
        kept = (memory + prompt[-max(1, budget - len(memory)):])[-budget:]  # a memory over budget loses its head
        if not kept:
            raise OpenAIError("prompt must not be empty: it has no tokens.", param="prompt")
        max_tokens = ctx.max_tokens_for(max_length, len(kept), param="max_length")
        try:
            badwords = await self.badword_ids() if request.use_default_badwordsids else []
            params = SamplingParams(max_tokens=max_tokens, **request.sampling_kwargs(badwords))
        except ValueError as e:  # SamplingParams checks every value, once; named here as the client sent it
            message, param = kobold_field(str(e))
            raise OpenAIError(message, param=param) from None
        genkey = request.genkey or new_id("kai")
        job = _Job()
        self.jobs.setdefault(genkey, []).append(job)
        try:
            text = (request.memory or "") + request.prompt if len(kept) == len(memory) + len(prompt) else None
            [stream] = await ctx.add_all([(new_id("kai"), text, kept, params)], _FIELDS)
        except BaseException:
            self._end(genkey, job)
            raise
        return genkey, job, stream, params, ctx.timer(arrival)

    def _end(self, genkey: str, job: _Job) -> None:
        jobs = self.jobs.get(genkey, [])
        if job in jobs:
            jobs.remove(job)
        if not jobs:
            self.jobs.pop(genkey, None)

    async def generate(self, request: KAIGenerationInputSchema, raw_request: Request) -> Response:
        """``{"results": [{"text", "finish_reason"}, ...]}``, one per sequence (``n``); an aborted
        generation answers with what it has ("abort")."""
        genkey, job, stream, params, timer = await self.start(request)
        try:
            results = await unless_disconnected(raw_request, self._collect(job, stream, params.n, timer))
        finally:
            self._end(genkey, job)
        if results is None:
            return Response(status_code=499)
        return JSONResponse({"results": results})

    async def _collect(self, job: _Job, stream: RequestStream, n: int, timer: RequestTimer) -> list[dict[str, Any]]:
        last: RequestOutput | None = None
        async for out in _outputs(job, stream):
            last = out
            _observe(job, out, timer)
        outputs = last.outputs if last is not None else []
        results = [{"text": c.text, "finish_reason": c.finish_reason or "abort"} for c in outputs]
        return results + [{"text": "", "finish_reason": "abort"}] * (n - len(results))

    async def stream(self, request: KAIGenerationInputSchema) -> Response:
        """Server-sent events ``event: message`` / ``data: {"token": ...}``: the first sequence's text as it
        grows (a stop string is held back until it is ruled out); the last event adds ``finish_reason``."""
        genkey, job, stream, params, timer = await self.start(request)

        def close() -> None:
            stream.close()
            self._end(genkey, job)
        return SSEResponse(self._events(job, stream, params, timer), close)

    async def _events(self, job: _Job, stream: RequestStream, params: SamplingParams,
                      timer: RequestTimer) -> AsyncIterator[str]:
        cursor = ChoiceCursor()
        holdback = stop_holdback(params)
        text = ""
        try:
            async for out in _outputs(job, stream):
                _observe(job, out, timer)
                c = out.outputs[0]
                text = c.text
                token = cursor.take_text(c, holdback)
                if c.finish_reason is not None:
                    yield _event({"token": token, "finish_reason": c.finish_reason})
                    return
                if token:
                    yield _event({"token": token})
            yield _event({"token": text[cursor.chars:], "finish_reason": "abort"})
        except Exception as e:
            yield "event: error\n" + sse_error(e)

    # ---- by genkey -------------------------------------------------------------------------------
    def _named(self, genkey: Any) -> list[_Job]:
        """The running jobs ``genkey`` names; without a genkey, as KoboldCpp: the one running job, if only one
        runs (clients such as SillyTavern abort with an empty body)."""
        if genkey is None or genkey == "":
            running = [job for jobs in self.jobs.values() for job in jobs]
            return running if len(running) == 1 else []
        return list(self.jobs.get(genkey, [])) if isinstance(genkey, str) else []

    def check(self, genkey: Any) -> str:
        """The text so far of the running generation ``genkey`` (the newest, when several share it; "" when
        there is none)."""
        jobs = self._named(genkey)
        return jobs[-1].text if jobs else ""

    def abort(self, genkey: Any) -> bool:
        """Stop the running generations ``genkey`` names; False when there is none."""
        jobs = self._named(genkey)
        for job in jobs:
            job.abort.set()
        return bool(jobs)


def _observe(job: _Job, out: RequestOutput, timer: RequestTimer) -> None:
    if out.outputs:
        job.text = out.outputs[0].text
    timer.observe(sum(len(c.token_ids) for c in out.outputs), out.finished,
                  out.outputs[0].finish_reason if out.outputs else None)


async def _outputs(job: _Job, stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """The stream's outputs until it finishes, or until the job is aborted: the request is then
    aborted in the engine (its blocks freed) and the iteration ends."""
    outs = merge_streams([stream])
    aborted = asyncio.ensure_future(job.abort.wait())
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(anext(outs))
            await asyncio.wait({pending, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if not pending.done():
                return
            try:
                _, out = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield out
    finally:
        aborted.cancel()
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})  # the merge ends (and closes its stream) before it is closed here
        await outs.aclose()
        stream.close()


def _event(data: dict[str, Any]) -> str:
    # U+2028/U+2029 escaped: JavaScript line terminators, which KoboldAI Lite's one-line event regex stops at.
    text = json.dumps(data, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"event: message\ndata: {text}\n\n"


async def _json_field(request: Request, name: str) -> Any:
    """``name`` from the query string, else from a JSON object body; None when neither has it."""
    value = request.query_params.get(name)
    if value is not None or request.method != "POST":
        return value
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return body.get(name) if isinstance(body, dict) else None


# ---- routes -----------------------------------------------------------------------------------------
def _body_spec(model: type[KAIGenerationInputSchema] | type[KAITokenizeRequest]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request: malformed JSON, wrong types, values out of range."},
    413: {"model": ErrorResponse, "description": "The request body is over --max-request-body-bytes."},
    503: {"model": ErrorResponse, "description": "The engine is not running, or too many sequences wait already."}}
# Module level: FastAPI resolves the routes' (string) annotations in this module's namespace.
_Generation = Annotated[KAIGenerationInputSchema, Depends(json_body(KAIGenerationInputSchema))]
_Tokenize = Annotated[KAITokenizeRequest, Depends(json_body(KAITokenizeRequest))]
_STREAM = {200: {"description": "Server-sent events: 'event: message' with data {\"token\": ...}.",
                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def add_kobold_routes(app: FastAPI, ctx: ServingContext, protected: bool = False) -> KoboldServing:
    """Mount the KoboldAI routes on ``app``: ``/api/v1`` (and ``/api/latest``) and ``/api/extra``; ``protected``
    (API keys are on) is what ``/api/extra/version`` tells clients, as KoboldCpp does with a password."""
    kobold = KoboldServing(ctx)
    kai, extra = APIRouter(tags=["KoboldAI"]), APIRouter(tags=["KoboldAI"])
    def value(v: Any) -> dict[str, Any]:
        return {"value": v}

    @kai.post("/generate", responses=_ERRORS, openapi_extra=_body_spec(KAIGenerationInputSchema))
    async def generate(request: _Generation, raw_request: Request) -> Response:
        return await kobold.generate(request, raw_request)

    @kai.get("/model")
    async def model() -> dict[str, str]:
        return {"result": f"aphrodite/{ctx.served_model_names[0]}"}

    @kai.get("/info/version")
    async def version() -> dict[str, str]:
        return {"result": KAI_VERSION}

    @kai.get("/config/max_length")  # the longest generation: what the context holds, as Aphrodite answers
    async def max_length() -> dict[str, Any]:
        return value(ctx.max_model_len)

    @kai.get("/config/max_context_length")
    async def max_context_length() -> dict[str, Any]:
        return value(ctx.max_model_len)

    @kai.get("/config/soft_prompts_list")  # soft prompts are not supported: none to list or pick
    async def soft_prompts_list() -> dict[str, Any]:
        return {"values": []}

    @kai.get("/config/soft_prompt")
    async def soft_prompt() -> dict[str, Any]:
        return value("")

    @kai.put("/config/soft_prompt")
    async def set_soft_prompt() -> dict[str, Any]:
        return {}

    @extra.post("/generate/stream", responses={**_ERRORS, **_STREAM},
                openapi_extra=_body_spec(KAIGenerationInputSchema))
    async def generate_stream(request: _Generation) -> Response:
        return await kobold.stream(request)

    @extra.api_route("/generate/check", methods=["GET", "POST"])
    async def check(raw_request: Request) -> dict[str, Any]:
        """The running generation's text so far, by ``genkey`` (query string or JSON body)."""
        return {"results": [{"text": kobold.check(await _json_field(raw_request, "genkey"))}]}

    @extra.post("/abort")
    async def abort(raw_request: Request) -> dict[str, Any]:
        """Stop the generation ``genkey`` (JSON body or query string); its request returns what it has."""
        kobold.abort(await _json_field(raw_request, "genkey"))
        return {}

    @extra.post("/tokencount", responses=_ERRORS, openapi_extra=_body_spec(KAITokenizeRequest))
    async def tokencount(request: _Tokenize) -> dict[str, Any]:
        """The prompt's token count and ids (no special tokens added)."""
        ids = await ctx.encode(request.prompt, add_special_tokens=False, whole=True)
        return {"value": len(ids), "ids": ids}

    @extra.get("/true_max_context_length")
    async def true_max_context_length() -> dict[str, Any]:
        return value(ctx.max_model_len)

    @extra.get("/preloadstory")
    async def preloadstory() -> dict[str, Any]:
        return {}

    @extra.get("/version")
    async def extra_version() -> dict[str, Any]:
        return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": protected}

    app.include_router(kai, prefix="/api/v1")
    app.include_router(kai, prefix="/api/latest", include_in_schema=False)
    app.include_router(extra, prefix="/api/extra")
    return kobold
