"""CPU-heavy request work off the event loop: chat-template rendering, tokenization, detokenization.

One request's 15 MB prompt or runaway template must not hold every other request, nor ``/health``.
The work runs in a small thread pool. That is enough because what is heavy either releases the
GIL (the Rust tokenizer's ``encode_batch`` and ``decode``; transformers' own ``encode`` and
``decode`` wrappers do not: they convert millions of ids while holding it, hence the direct
calls below) or is Python bytecode (Jinja), which yields the GIL to the event loop every few
milliseconds and is cut by a time budget (``chat_template.time_budget``). The workers share
the server's tokenizer: they only read it (encode, decode, id lookups, the template), and the
Rust tokenizer allows concurrent reads; what is unsafe is changing its truncation or padding
while another thread encodes, which nothing here does. (A copy per thread would cost a 0.5 s
GIL-holding deep copy the first time each thread runs: a stall of its own.)

Big request bodies are parsed and validated here too (``parse``): a 16 MB list of token ids
takes pydantic a second of Python calls, which on the event loop would hold every other request.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["DEFAULT_NUM_WORKERS", "RequestWorkers", "decode", "encode"]

T = TypeVar("T")

DEFAULT_NUM_WORKERS = 2


def _rust_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer, or None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if type(backend).__name__ == "Tokenizer" and hasattr(backend, "encode_batch") else None


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text)``, through the Rust batch call that releases the GIL while it works.

    ``encode_batch_fast`` (no character offsets) is also twice as fast, and unlike ``encode`` and
    ``encode_batch`` it does not hold the GIL for a few hundred ms at the end of a 1 MB text.
    """
    backend = _rust_tokenizer(tokenizer)
    if backend is None:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return batch([text], add_special_tokens=add_special_tokens)[0].ids


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
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="aphrodite-request")

    def tokenizer(self) -> Any:
        """The tokenizer, for reading inside a job (see the module docstring)."""
        return self._tokenizer

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(lambda: encode(self.tokenizer(), text, add_special_tokens))

    async def decode(self, ids: list[int]) -> str:
        return await self.run(lambda: decode(self.tokenizer(), ids))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
