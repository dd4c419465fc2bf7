"""Structured output on xgrammar: JSON Schema, JSON object, regex, choice and grammars.

The engine owns one ``StructuredOutputManager``. Grammars are compiled once per key (the same
schema twice compiles once) in a thread pool, so the engine loop keeps decoding other requests
while a new schema compiles. Each constrained request gets its own ``GrammarMatcher``, advanced
with every accepted token; before a step the engine fills each constrained row's token bitmask
on the host (xgrammar's layout: bit j of int32 word i allows token 32*i + j) and the worker
applies it to the logits on the device.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from aphrodite.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

__all__ = ["GrammarState", "StructuredOutputManager", "bitmask_width"]


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return (vocab_size + 31) // 32


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar that accepts exactly one of ``choices``."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputManager:
    """Compiles constraints (cached per key, off the caller's thread) and makes per-request matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...] = (),
                 max_workers: int = 2, cache_size: int = 256, pin_memory: bool = False) -> None:
        import xgrammar as xgr
        self._xgr = xgr
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_workers)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="aphrodite-grammar")
        # Fills many rows' bitmasks in one call on xgrammar's own threads (the GIL released): the fill sits
        # on the engine loop's critical path, where one Python call per row cost the GPU most of its steps.
        threads = max(1, min(8, os.cpu_count() or 1))
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        # Accepting a step's tokens costs ~25 us per matcher (more than filling its mask) and xgrammar's
        # calls release the GIL, so a large batch's tokens are accepted in chunks on these threads.
        self._accept_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aphrodite-grammar-accept") \
            if threads > 1 else None
        self._threads = threads
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._cache_size = cache_size
        # ``batch_bitmask`` 's two alternating buffers; pinned when the worker is in this process with a GPU,
        # so the mask is copied to the device from where it is filled.
        self._buffers: list[np.ndarray | None] = [None, None]
        self._pinned: list[Any] = [None, None]      # the torch tensors that own pinned buffers
        self._which = 0
        self._pin_memory = pin_memory

    def submit(self, so: StructuredOutputsParams) -> Future:
        """The compiled grammar of ``so`` as a future; compiled in the pool unless already cached.
        A grammar that cannot be compiled resolves to a ``ValueError`` with the library's message."""
        key = so.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, so)
            self._cache[key] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return fut

    def compile(self, so: StructuredOutputsParams) -> Any:
        """Blocking ``submit``: the compiled grammar, or ``ValueError``."""
        return self.submit(so).result()

    def _compile(self, so: StructuredOutputsParams) -> Any:
        kind = so.kind
        try:
            if kind == "json":
                schema = so.json if isinstance(so.json, str) else json.dumps(so.json)
                return self.compiler.compile_json_schema(schema, any_whitespace=not so.disable_any_whitespace)
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}',
                                                         any_whitespace=not so.disable_any_whitespace)
            if kind == "regex":
                return self.compiler.compile_regex(so.regex)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(so.choice))
            if "::=" in so.grammar:
                return self.compiler.compile_grammar(so.grammar)
            return self.compiler.compile_lark(so.grammar)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with its own message
            raise ValueError(f"Invalid structured output {kind}: {e}") from None

    def matcher(self, compiled: Any) -> GrammarState:
        return GrammarState(self._xgr.GrammarMatcher(compiled))

    def new_bitmask(self, rows: int) -> np.ndarray:
        """A [rows, width] int32 bitmask with every token allowed (unconstrained rows stay so)."""
        return np.full((rows, self.width), -1, dtype=np.int32)

    def batch_bitmask(self, num_rows: int, rows: list[int], states: list[GrammarState]) -> np.ndarray:
        """A step's [num_rows, width] bitmask: row ``rows[i]`` from ``states[i]``, every other row all ones.
        Written into one of two reused buffers (a 128k vocabulary's mask is 4 MiB per 256 rows), alternately:
        valid until the call after next. An executor copies or pickles it when the step is sent; an in-process
        GPU worker copies it to the device asynchronously, done before the engine reads that step's result,
        which it has always done by its second fill after (async scheduling keeps one step in flight)."""
        self._which ^= 1
        buf = self._buffers[self._which]
        if buf is None or buf.shape[0] < num_rows:
            shape = (max(num_rows, 2 * (0 if buf is None else buf.shape[0])), self.width)
            if self._pin_memory:
                import torch
                self._pinned[self._which] = torch.empty(shape, dtype=torch.int32, pin_memory=True)
                buf = self._pinned[self._which].numpy()
            else:
                buf = np.empty(shape, dtype=np.int32)
            self._buffers[self._which] = buf
        bitmask = buf[:num_rows]
        if len(rows) < num_rows:
            keep = np.ones(num_rows, dtype=bool)
            keep[rows] = False
            bitmask[keep] = -1
        self.fill_many(bitmask, rows, states)
        return bitmask

    def fill(self, bitmask: np.ndarray, row: int, state: GrammarState) -> None:
        """Write ``state``'s allowed next tokens into ``bitmask[row]``."""
        self.fill_many(bitmask, [row], [state])

    def fill_many(self, bitmask: np.ndarray, rows: list[int], states: list[GrammarState]) -> None:
        """Write each state's allowed next tokens into its row of ``bitmask``, all in one call."""
        import torch
        self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], torch.from_numpy(bitmask),
                                                  indices=rows)

    def accept_many(self, states: list[GrammarState], tokens: list[int]) -> None:
        """``states[i].accept(tokens[i])`` for every i (each state's ``failed`` tells a rejected token),
        in parallel chunks when the batch is large."""
        chunks = min(self._threads, len(states) // _ACCEPT_CHUNK)
        if chunks <= 1 or self._accept_pool is None:
            for state, token in zip(states, tokens):
                state.accept(token)
            return
        size = -(-len(states) // chunks)
        futures = [self._accept_pool.submit(_accept_chunk, states[i:i + size], tokens[i:i + size])
                   for i in range(size, len(states), size)]
        _accept_chunk(states[:size], tokens[:size])
        for fut in futures:
            fut.result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._accept_pool is not None:
            self._accept_pool.shutdown(wait=False, cancel_futures=True)


_ACCEPT_CHUNK = 32      # matchers per thread at least: below that a thread hand-off costs more than it saves


def _accept_chunk(states: list[GrammarState], tokens: list[int]) -> None:
    for state, token in zip(states, tokens):
        state.accept(token)


class GrammarState:
    """One request's matcher and how many of its output tokens it has accepted."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.num_accepted = 0
        self.failed = False

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False (and ``failed``) when the grammar rejects it."""
        self.num_accepted += 1
        if self.failed or self.matcher.is_terminated():
            return not self.failed
        if not self.matcher.accept_token(token):
            logger.warning("The grammar rejected sampled token %d; ending the request.", token)
            self.failed = True
        return not self.failed

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()
