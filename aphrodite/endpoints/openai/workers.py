"""CPU-heavy request work off the event loop: chat-template rendering, tokenization, detokenization.

One request's 15 MB prompt or runaway template must not hold every other request, nor ``/health``.
The work runs in a small thread pool. That is enough because what is heavy either releases the
GIL (the Rust tokenizer's ``encode_batch`` and ``decode``; transformers' own ``encode`` and
``decode`` wrappers do not: they convert millions of ids while holding it, hence the direct
calls below) or is Python bytecode (Jinja), which yields the GIL to the event loop every few
milliseconds and is cut by a time budget (``chat_template.time_budget``). Each worker thread
has its own tokenizer copy: a fast tokenizer is not safe to share between threads.
"""
from __future__ import annotations

import asyncio
import copy
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["DEFAULT_NUM_WORKERS", "RequestWorkers", "decode", "encode"]

T = TypeVar("T")

DEFAULT_NUM_WORKERS = 4


def _rust_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer, or None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if type(backend).__name__ == "Tokenizer" and hasattr(backend, "encode_batch") else None


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text)``, through the Rust batch call that releases the GIL while it works."""
    backend = _rust_tokenizer(tokenizer)
    if backend is None:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def decode(tokenizer: Any, ids: list[int]) -> str:
    """``tokenizer.decode(ids)`` (special tokens kept), through the Rust call that releases the GIL."""
    backend = _rust_tokenizer(tokenizer)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode(ids)
    return backend.decode(ids, skip_special_tokens=False)


class RequestWorkers:
    """A bounded pool of threads for request work; ``run`` awaits one job from the event loop."""

    def __init__(self, tokenizer: Any, num_workers: int = DEFAULT_NUM_WORKERS) -> None:
        if num_workers < 1:
            raise ValueError(f"The request worker pool needs at least 1 thread, got {num_workers}.")
        self._tokenizer = tokenizer
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="aphrodite-request")

    def tokenizer(self) -> Any:
        """This worker thread's own copy of the tokenizer (call it inside a job)."""
        tok = getattr(self._local, "tokenizer", None)
        if tok is None and self._tokenizer is not None:
            tok = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        return tok

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(lambda: encode(self.tokenizer(), text, add_special_tokens))

    async def decode(self, ids: list[int]) -> str:
        return await self.run(lambda: decode(self.tokenizer(), ids))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
