"""``AsyncLLMEngine``: the synchronous engine driven by its own thread, for asyncio servers.

The HTTP event loop must never run model code or wait on it, so one thread owns the
``LLMEngine`` and is the only code that touches it. Requests and aborts reach that thread
through a queue; each step's outputs go back in one ``loop.call_soon_threadsafe`` call that
puts them on per-request asyncio queues. The thread blocks on the queue while idle and never
sleeps while requests are in flight.

Outputs are cumulative (text and tokens so far), so a consumer that falls behind simply reads
the latest one and skips the ones in between.

Admission is bounded: with ``max_waiting_requests`` set, at most that many sequences wait
beyond the ``max_num_seqs`` that can run; a request that would exceed it is refused at once
with ``QueueFullError`` (the server's 503), instead of queueing without limit.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aphrodite.engine.engine import LLMEngine, PromptType
from aphrodite.engine_args import EngineArgs
from aphrodite.executor.base import ExecutorDeadError
from aphrodite.lora.request import LoRARequest
from aphrodite.outputs import RequestOutput
from aphrodite.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineStats", "QueueFullError", "RequestStream"]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down or crashed); no request can be served."""


class QueueFullError(RuntimeError):
    """Admitting the request would make more sequences wait than ``max_waiting_requests`` allows."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after each step, for metrics readers on other threads."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0


_ACCEPTED = object()  # first item of a stream: the engine took the request


class RequestStream:
    """The asyncio side of one request: an async iterator of cumulative ``RequestOutput`` s.

    ``close()`` (also called when iteration ends or is cancelled) aborts the request in the
    engine if it has not finished, which frees its KV blocks.
    """

    def __init__(self, engine: AsyncLLMEngine, request_id: str, loop: asyncio.AbstractEventLoop,
                 num_seqs: int = 1) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._closed = False
        self._num_seqs = num_seqs  # admitted sequences, given back once when the stream ends

    def _release(self) -> None:
        if self._num_seqs:
            self._engine._release(self._num_seqs)
            self._num_seqs = 0

    # Called on the event loop (scheduled by the engine thread).
    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
            # Skip to the newest output: each one holds everything produced so far.
            while not isinstance(item, BaseException) and not self._queue.empty():
                item = self._queue.get_nowait()
        except BaseException:
            self.close()
            raise
        if isinstance(item, BaseException):
            self.finished = True  # the engine already dropped the request
            self._release()
            raise item
        if item.finished:
            self.finished = True
            self._release()
        return item

    def close(self) -> None:
        """Stop listening; abort the request in the engine unless it already finished."""
        if self._closed:
            return
        self._closed = True
        self._release()
        if not self.finished:
            self._engine._post(("abort", self.request_id))


class AsyncLLMEngine:
    """Runs an ``LLMEngine`` on a dedicated thread; safe to use from any asyncio event loop."""

    def __init__(self, engine: LLMEngine, start: bool = True, max_waiting_requests: int | None = None) -> None:
        self.engine = engine  # owned by the engine thread once started: do not call into it
        # Facts fixed at start-up, safe to read from any thread.
        self.config = engine.config
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be at least 0, got {max_waiting_requests}.")
        # Sequences admitted and not finished, against their limit (None: unbounded).
        self.max_seqs_in_flight = (None if max_waiting_requests is None
                                   else engine.config.scheduler.max_num_seqs + max_waiting_requests)
        self._seqs_in_flight = 0
        self._admission = threading.Lock()
        # A private tokenizer copy for the caller's thread: a fast tokenizer is not safe to share
        # with the engine thread, which detokenizes with its own.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine-thread side: request id -> stream
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self.stats = self._snapshot()
        if start:
            self.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, start: bool = True, max_waiting_requests: int | None = None,
                         usage_context: str = "server") -> AsyncLLMEngine:
        return cls(LLMEngine.from_engine_args(args, usage_context), start=start,
                   max_waiting_requests=max_waiting_requests)

    # ---- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="aphrodite-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def errored(self) -> bool:
        return self._dead is not None

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort every request, stop the engine thread and wait for it."""
        if self._thread is None:
            return
        self._post(("stop",))
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("The engine thread did not stop within %.0f s.", timeout)

    # ---- the asyncio side --------------------------------------------------------
    def _post(self, command: tuple) -> None:
        self._inbox.put(command)

    @property
    def num_seqs_in_flight(self) -> int:
        """Sequences admitted (running or waiting) and not finished yet."""
        return self._seqs_in_flight

    def _admit(self, num_seqs: int) -> None:
        with self._admission:
            limit = self.max_seqs_in_flight
            if limit is not None and self._seqs_in_flight + num_seqs > limit:
                raise QueueFullError(
                    f"The server is at capacity ({self._seqs_in_flight} sequences running or waiting, at most "
                    f"{limit}); retry shortly.")
            self._seqs_in_flight += num_seqs

    def _release(self, num_seqs: int) -> None:
        with self._admission:
            self._seqs_in_flight -= num_seqs

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          arrival_time: float | None = None, lora_request: LoRARequest | None = None) -> RequestStream:
        """Hand a request to the engine; returns once the engine accepted it.

        Raises ``ValueError`` when the engine rejects the request (too long, bad ids, ...),
        so an HTTP handler can answer 400 before it starts a streamed response, and
        ``QueueFullError`` when too many sequences wait already.
        """
        if self._dead is not None or self._thread is None:
            raise EngineDeadError(f"The engine is not running ({self._dead or 'not started'}).")
        num_seqs = max(params.best_of or 1, params.n)
        self._admit(num_seqs)
        stream = RequestStream(self, request_id, asyncio.get_running_loop(), num_seqs)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        self._post(("add", stream, prompt, params, arrival, lora_request))
        try:
            while True:
                try:
                    first = await asyncio.wait_for(stream._queue.get(), timeout=1.0)
                    break
                except asyncio.TimeoutError:
                    # Posted just as the loop stopped: nobody will answer, so answer here.
                    if self._dead is not None and not (self._thread and self._thread.is_alive()):
                        raise EngineDeadError(f"The engine is not running ({self._dead}).") from None
        except BaseException:  # cancelled while waiting: make sure nothing stays behind
            stream.close()
            raise
        if isinstance(first, BaseException):
            stream.finished = True
            stream._release()
            raise first
        return stream

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes.

        A ``ValueError`` for a rejected request is raised before the first output; leaving the
        loop early (a client disconnect cancels it) aborts the request.
        """
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter on the engine thread; ``ValueError`` if it cannot be served."""
        return await self._call(lambda engine: engine.add_lora(lora_request))

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._call(lambda engine: engine.remove_lora(lora_int_id))

    async def _call(self, fn: Any) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps; its result or exception comes back."""
        if self._dead is not None or self._thread is None:
            raise EngineDeadError(f"The engine is not running ({self._dead or 'not started'}).")
        future = asyncio.get_running_loop().create_future()
        self._post(("call", fn, future))
        return await future

    async def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed before the engine's next step."""
        self._post(("abort", request_id))

    # ---- the engine thread ---------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                # Block while idle; otherwise take whatever arrived during the last step.
                if not engine.has_unfinished_requests():
                    if not self._handle(self._inbox.get()):
                        break
                if not self._drain():
                    break
                if engine.has_unfinished_requests():
                    self._step()
                else:
                    self.stats = self._snapshot()
        except BaseException as e:  # the workers are gone, or a bug in the loop: fail everyone, refuse new work
            if isinstance(e, ExecutorDeadError):
                logger.error("The engine's workers failed: %s", e)
                error = EngineDeadError(f"The engine's workers failed: {e}")
            else:
                logger.exception("The engine loop crashed")
                error = EngineDeadError(f"The engine loop crashed: {type(e).__name__}: {e}")
            self._dead = error
            self._fail_all(error)
            self._shutdown_engine()
            self._answer_late_adds(error)
            return
        self._dead = EngineDeadError("The engine has shut down.")
        self._fail_all(self._dead)
        self._shutdown_engine()
        self._answer_late_adds(self._dead)

    def _shutdown_engine(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("Shutting the executor down raised")

    def _answer_late_adds(self, error: BaseException) -> None:
        """Answer requests posted after the loop stopped."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                self._deliver(cmd[1], error)
            elif cmd[0] == "call":
                _call_soon(cmd[2].get_loop(), _settle, cmd[2], None, error)

    def _drain(self) -> bool:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if not self._handle(cmd):
                return False

    def _handle(self, cmd: tuple) -> bool:
        """Apply one command; False means stop."""
        kind = cmd[0]
        if kind == "add":
            _, stream, prompt, params, arrival, lora = cmd
            try:
                extra = {"lora_request": lora} if lora is not None else {}
                self.engine.add_request(stream.request_id, prompt, params, arrival_time=arrival, **extra)
            except Exception as e:  # ValueError: the request is invalid; anything else: report it
                self._deliver(stream, e)
                return True
            self._streams[stream.request_id] = stream
            self._deliver(stream, _ACCEPTED)
        elif kind == "abort":
            rid = cmd[1]
            if self._streams.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                logger.info("Aborted request %s.", rid)
        elif kind == "call":
            _, fn, future = cmd
            try:
                result, error = fn(self.engine), None
            except Exception as e:   # ValueError: a bad adapter; the caller decides
                result, error = None, e
            _call_soon(future.get_loop(), _settle, future, result, error)
            if isinstance(error, ExecutorDeadError):
                raise error
        elif kind == "stop":
            return False
        return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except ExecutorDeadError:
            raise   # no rank left to run anything: the loop stops and every request fails
        except Exception as e:
            # The batch that failed is every request in flight: fail them, free their blocks,
            # and keep serving new requests.
            logger.exception("Engine step failed; failing the %d requests in flight", len(self._streams))
            self._fail_all(RuntimeError(f"The engine failed while running this request: {type(e).__name__}: {e}"))
            self.stats = self._snapshot()
            return
        self.stats = self._snapshot()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver_many, items)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        try:
            self.engine.abort_request(list(streams))
        except Exception:
            logger.exception("Aborting failed requests raised")
        for stream in streams.values():
            self._deliver(stream, error)

    @staticmethod
    def _deliver(stream: RequestStream, item: Any) -> None:
        _call_soon(stream.loop, stream._put, item)

    def _snapshot(self) -> EngineStats:
        e = self.engine
        return EngineStats(
            num_running=len(e.scheduler.running), num_waiting=len(e.scheduler.waiting),
            num_blocks=e.kv_cache.num_blocks, num_free_blocks=e.kv_cache.num_free_blocks,
            kv_cache_usage=e.kv_cache.usage, num_prompt_tokens=e.num_prompt_tokens,
            num_generation_tokens=e.num_generated_tokens, num_preemptions=e.total_preemptions)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():   # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver_many(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream._put(out)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        pass
