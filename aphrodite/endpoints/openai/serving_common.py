"""What the completion and chat handlers share: model checks, token budgets, handing requests to
the engine, merging their output streams, streaming text safely, SSE framing, disconnects.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from aphrodite.endpoints.openai.errors import OpenAIError, error_body, from_value_error
from aphrodite.endpoints.openai.metrics import RequestTimer, ServerMetrics
from aphrodite.endpoints.openai.protocol import SamplingFields
from aphrodite.endpoints.openai.serving_lora import LoRARegistry
from aphrodite.endpoints.openai.workers import RequestWorkers
from aphrodite.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError, RequestStream
from aphrodite.lora.request import LoRARequest
from aphrodite.outputs import CompletionOutput, Logprob, RequestOutput
from aphrodite.sampling_params import SamplingParams

logger = logging.getLogger("aphrodite.endpoints.openai")

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
# A prompt this many characters per context token (or more) is first tokenized by its head alone: when
# that already overflows the context by more than the margin, the rest (megabytes, maybe) is never read.
_PROBE_CHARS_PER_TOKEN = 8
_PROBE_MARGIN_TOKENS = 64


class ServingContext:
    """The server's fixed facts and helpers, shared by every handler."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str], *,
                 chat_template: str | None = None, response_role: str = "assistant",
                 log_requests: bool = False, max_log_len: int | None = None,
                 metrics: ServerMetrics | None = None, trust_request_chat_template: bool = False,
                 workers: RequestWorkers | None = None) -> None:
        cfg = engine.config
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served_model_names = list(served_model_names)
        self.model_path = cfg.model.path
        self.max_model_len = cfg.scheduler.max_model_len
        self.max_num_seqs = cfg.scheduler.max_num_seqs
        self.max_logprobs = cfg.model.max_logprobs
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template
        self.response_role = response_role
        self.log_requests = log_requests
        self.max_log_len = max_log_len
        self.metrics = metrics or ServerMetrics(engine, self.served_model_names[0])
        self.loras = LoRARegistry(engine, self.served_model_names[0])   # adapters, also valid model names
        self.workers = workers or RequestWorkers(self.tokenizer)

    # ---- request checks ----------------------------------------------------------
    def check_model(self, name: str | None, required: bool = True) -> LoRARequest | None:
        """The LoRA adapter ``name`` stands for (None for the base model); 404 for an unknown name."""
        if name is None and not required:
            return None
        lora = self.loras.by_name.get(name) if name is not None else None
        if lora is not None:
            return lora
        if name not in self.served_model_names:
            # vLLM's type (NotFoundError) with OpenAI's code (model_not_found): clients check either.
            raise OpenAIError(f"The model `{name}` does not exist. Served models: "
                              f"{', '.join([*self.served_model_names, *self.loras.by_name])}.", HTTPStatus.NOT_FOUND,
                              param="model", code="model_not_found", type="NotFoundError")
        return None

    @staticmethod
    def check_stream_options(request: SamplingFields) -> None:
        """``stream_options`` only make sense on a stream: refused otherwise, as vLLM and OpenAI do."""
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("Stream options can only be defined when `stream=True`.", param="stream_options")

    def truncate(self, ids: list[int], k: int | None) -> list[int]:
        """The last ``k`` prompt tokens (vLLM's ``truncate_prompt_tokens``; -1 means max_model_len)."""
        if k is None:
            return ids
        if k == -1:
            k = self.max_model_len
        if k < 1 or k > self.max_model_len:
            raise OpenAIError(f"truncate_prompt_tokens must be -1 or between 1 and max_model_len "
                              f"({self.max_model_len}), got {k}.", param="truncate_prompt_tokens")
        return ids[-k:]

    def need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise OpenAIError("This server was started with skip_tokenizer_init: send token ids, not text.")
        return self.tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True, *, whole: bool = False,
                     prompt_name: str = "prompt") -> list[int]:
        """The token ids of ``text``, tokenized on a worker thread.

        Unless ``whole`` (``/tokenize``, truncation), a text far longer than the context is refused
        from its head alone: tokenizing all of a 10 MB prompt to learn it does not fit would cost
        seconds of CPU. Tokens of a prefix can differ from the whole text's only near the cut,
        which the margin covers.
        """
        self.need_tokenizer()
        probe = self.max_model_len * _PROBE_CHARS_PER_TOKEN
        if not whole and len(text) > probe:
            head = await self.workers.encode(text[:probe], add_special_tokens)
            if len(head) > self.max_model_len + _PROBE_MARGIN_TOKENS:
                raise OpenAIError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                    f"{prompt_name} has more than {len(head) - _PROBE_MARGIN_TOKENS} tokens ({len(text)} "
                    f"characters). Please reduce the length of the {prompt_name}.", param=prompt_name,
                    code="context_length_exceeded")
        return await self.workers.encode(text, add_special_tokens)

    def check_num_seqs(self, n: int | None, best_of: int | None, num_prompts: int = 1) -> None:
        """Admission limits known before any work: ``n`` and ``best_of`` at most ``max_num_seqs``, and a
        request's sequences (prompts x best_of) no more than the server ever admits at once."""
        n = n if n is not None else 1
        for name, value in (("n", n), ("best_of", best_of)):
            if isinstance(value, int) and value > self.max_num_seqs:
                raise OpenAIError(f"{name} must be at most max_num_seqs ({self.max_num_seqs}), got {value}.",
                                  param=name)
        limit = self.engine.max_seqs_in_flight
        seqs = num_prompts * max(n, best_of or 1)
        if limit is not None and seqs > limit:
            raise OpenAIError(f"This request needs {seqs} sequences ({num_prompts} prompts x {max(n, best_of or 1)})"
                              f"; the server admits at most {limit} at a time (max_num_seqs + max_waiting_requests).",
                              param="prompt" if num_prompts > 1 else "n")

    def token_str(self, token_id: int, lp: Logprob | None = None) -> str:
        """A token's text for logprobs: the engine's decoding when it sent one."""
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def max_tokens_for(self, requested: int | None, prompt_len: int, param: str = "max_tokens",
                       prompt_name: str = "prompt") -> int | None:
        """``requested``, or what is left of the context when omitted (vLLM's default).

        A request whose prompt plus ``requested`` exceeds the context is refused here; the
        engine alone would quietly stop at ``max_model_len``.
        """
        left = self.max_model_len - prompt_len
        if requested is None:
            if left <= 0:  # OpenAI's and vLLM's wording, so clients that look for it recognise it
                raise OpenAIError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                    f"{prompt_name} resulted in {prompt_len} tokens, which leaves no room for the completion. "
                    f"Please reduce the length of the {prompt_name}.", param=prompt_name,
                    code="context_length_exceeded")
            return left
        if isinstance(requested, int) and requested > 0 and requested > left:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
                f"Please reduce the length of the prompt or of {param}.", param=param, code="context_length_exceeded")
        return requested

    def sampling_params(self, request: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        **overrides: Any) -> SamplingParams:
        try:
            return request.to_sampling_params(max_tokens, logprobs, **overrides)
        except ValueError as e:  # SamplingParams validates every field, once
            raise from_value_error(e, set(type(request).model_fields)) from None
        except TypeError as e:
            raise OpenAIError(f"Invalid sampling parameters: {e}") from None

    def log_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        if not self.log_requests:
            return
        n = self.max_log_len
        shown_prompt = prompt if prompt is None or n is None else prompt[:n]
        shown_ids = prompt_ids if n is None else prompt_ids[:n]
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                    request_id, shown_prompt, params, shown_ids)

    # ---- engine --------------------------------------------------------------------
    async def add_all(self, items: list[tuple[str, str | None, list[int], SamplingParams]],
                      fields: Sequence[str] = (), lora_request: LoRARequest | None = None) -> list[RequestStream]:
        """Add every (request id, text, ids, params) at once, with the adapter ``lora_request`` (or none);
        all are accepted, or none stays.

        The engine thread takes them in one go, so a batch costs one round trip, not one per prompt.
        """
        for rid, text, ids, params in items:
            self.log_request(rid, text, ids, params)
        await self.check_structured_outputs([params for _, _, _, params in items])
        results = await asyncio.gather(
            *(self.engine.add_request(rid, {"prompt": text, "prompt_token_ids": ids}, params,
                                      lora_request=lora_request)
              for rid, text, ids, params in items), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if isinstance(r, RequestStream):
                    r.close()
            err = errors[0]
            if isinstance(err, ValueError):
                raise from_value_error(err, set(fields)) from None
            if isinstance(err, EngineDeadError):
                raise OpenAIError(str(err), HTTPStatus.SERVICE_UNAVAILABLE) from None
            if isinstance(err, QueueFullError):
                raise OpenAIError(str(err), HTTPStatus.SERVICE_UNAVAILABLE, code="server_busy") from None
            raise err
        return results  # type: ignore[return-value]

    async def check_structured_outputs(self, params: list[SamplingParams]) -> None:
        """Compile the requests' schemas or grammars off the event loop and the engine thread (cached, so
        the engine then finds them ready); one that does not compile is a 400 with xgrammar's message."""
        wanted = [p for p in params if p.structured_outputs is not None]
        if not wanted:
            return
        engine = self.engine.engine
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.compile_structured_outputs, wanted)
        except ValueError as e:
            raise from_value_error(e, {"response_format", "structured_outputs", "guided_json", "guided_regex",
                                       "guided_choice", "guided_grammar"}) from None

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self.metrics, arrival)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def unix_now() -> int:
    return int(time.time())


def stop_holdback(params: SamplingParams) -> int:
    """Characters to hold back while streaming: a stop string may still complete there, and the
    engine then cuts the text at its start."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop) - 1


class ChoiceCursor:
    """How much of one choice's cumulative text and tokens has been sent."""

    __slots__ = ("chars", "tokens", "done", "started")

    def __init__(self) -> None:
        self.chars = 0
        self.tokens = 0
        self.done = False
        self.started = False

    def take_text(self, c: CompletionOutput, holdback: int) -> str:
        end = len(c.text) if c.finish_reason is not None else max(self.chars, len(c.text) - holdback)
        delta = c.text[self.chars:end]
        self.chars = end
        return delta

    def take_tokens(self, c: CompletionOutput) -> tuple[int, int]:
        """The [start, end) range of token positions not sent yet."""
        start, self.tokens = self.tokens, len(c.token_ids)
        return start, self.tokens


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (stream index, output) from several streams as outputs arrive; closes them all at the end.

    An engine failure comes out as an ``OpenAIError`` (500, or 503 once the engine is gone).
    """
    merged = _merge(streams) if len(streams) > 1 else None
    try:
        if merged is None:
            async for out in streams[0]:
                yield 0, out
        else:
            async for item in merged:
                yield item
    except EngineDeadError as e:
        raise OpenAIError(str(e), HTTPStatus.SERVICE_UNAVAILABLE) from e
    except (OpenAIError, ValueError):
        raise
    except Exception as e:
        raise OpenAIError(str(e), HTTPStatus.INTERNAL_SERVER_ERROR) from e
    finally:
        if merged is not None:
            await merged.aclose()  # cancels its pending reads now, not at garbage collection
        for s in streams:
            s.close()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, out
    finally:
        for task in pending:
            task.cancel()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(e: BaseException) -> str:
    """An error inside a started stream: sent as an event, since the status line has gone already."""
    if isinstance(e, OpenAIError):
        return sse(error_body(e.message, e.status, param=e.param, code=e.code))
    logger.error("Error while streaming: %s: %s", type(e).__name__, e)
    return sse(error_body(f"{type(e).__name__}: {e}", HTTPStatus.INTERNAL_SERVER_ERROR))


class SSEResponse(StreamingResponse):
    """A server-sent-events response that runs ``on_close`` however it ends (even if the client
    left before the first chunk), so no request outlives its connection."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def closer(streams: list[RequestStream]) -> Callable[[], None]:
    def close() -> None:
        for s in streams:
            s.close()
    return close


async def unless_disconnected(raw_request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``; if the client disconnects first, cancel it (which aborts its requests) and
    return None."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        return None
    return task.result()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def raw_prompt_logprobs(out: RequestOutput) -> list[dict[int, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` field: per prompt position, token id -> logprob, rank, decoded token."""
    return [None if e is None else {t: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in (out.prompt_logprobs or [])]
