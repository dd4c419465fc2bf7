"""``aphrodite chat`` and ``aphrodite complete``: small interactive clients of a running server
(vLLM's ``vllm chat`` / ``vllm complete``), built on the official ``openai`` client.

Each reply is streamed to stdout as it arrives. ``-q/--quick`` sends one message (or prompt) and
exits; otherwise a ``> `` prompt reads lines until end of input (Ctrl-D) or Ctrl-C. The model is
``--model`` or the first one the server lists.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any
from urllib.parse import urlsplit

__all__ = ["add_chat_args", "add_complete_args", "cmd_chat", "cmd_complete"]

DEFAULT_URL = "http://localhost:2242/v1"


def _add_query_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="Base URL of the running OpenAI-compatible server; a bare host:port gets /v1. "
                             f"(default: {DEFAULT_URL})")
    parser.add_argument("--model", "--model-name", dest="model_name", default=None, metavar="NAME",
                        help="Model to use. (default: the first model the server lists)")
    parser.add_argument("--api-key", default=None,
                        help="API key sent as a bearer token; overrides OPENAI_API_KEY. (default: OPENAI_API_KEY, "
                             "else none)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="Most tokens to generate per reply. (default: the server's, the rest of the context)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="Sampling temperature; 0 is greedy. (default: the server's)")
    parser.add_argument("--stats", action="store_true", default=False,
                        help="Print time to first token and tokens per second after each reply.")


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    """``aphrodite chat``'s flags: vLLM's (the server's port as the default URL), plus ``--max-tokens``
    and ``--temperature``."""
    _add_query_args(parser)
    parser.add_argument("--system-prompt", default=None, metavar="TEXT",
                        help="A system message placed before the conversation. (default: none)")
    parser.add_argument("-q", "--quick", default=None, metavar="MESSAGE",
                        help="Send MESSAGE, print the reply, and exit.")


def add_complete_args(parser: argparse.ArgumentParser) -> None:
    """``aphrodite complete``'s flags: vLLM's (the server's port as the default URL), plus ``--temperature``."""
    _add_query_args(parser)
    parser.add_argument("-q", "--quick", default=None, metavar="PROMPT",
                        help="Complete PROMPT, print the completion, and exit.")


def _connect(args: argparse.Namespace) -> tuple[Any, str]:
    """The ``openai`` client and the model name; a ``ValueError`` says why not (no package, no server)."""
    try:
        import openai
    except ImportError:
        raise ValueError("these commands use the openai client: pip install openai") from None
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would break into the replies
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    if urlsplit(args.url).path in ("", "/"):  # http://host:2242 is the server: its API is under /v1
        args.url = args.url.rstrip("/") + "/v1"
    client = openai.OpenAI(base_url=args.url, api_key=api_key)
    model = args.model_name
    if not model:
        try:
            models = client.models.list().data
        except openai.APIConnectionError as e:
            raise ValueError(f"cannot reach a server at {args.url}: {e}") from None
        except openai.APIStatusError as e:
            raise ValueError(f"listing the models at {args.url} failed: {e}") from None
        if not models:
            raise ValueError(f"the server at {args.url} lists no model.")
        model = models[0].id
    print(f"Using model: {model}", file=sys.stderr)
    return client, model


def print_stream(chunks: Iterable[Any], text_of: Any, stats: bool = False, out: IO[str] | None = None) -> str:
    """Print each chunk's text as it arrives and return the whole reply; with ``stats``, time to the
    first token and tokens per second (from the usage the server sends last)."""
    out = out or sys.stdout
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    parts: list[str] = []
    for chunk in chunks:
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        text = text_of(chunk.choices[0])
        if text:
            if first is None:
                first = time.perf_counter() - start
            parts.append(text)
            out.write(text)
            out.flush()
    out.write("\n")
    out.flush()
    total = time.perf_counter() - start
    if stats and first is not None and total > 0:
        print(f"TTFT: {first * 1000:.2f} ms", file=out)
        print(f"TPS:  {tokens / total:.2f} tokens/s ({tokens} tokens in {total:.2f} s)", file=out)
    return "".join(parts)


def _lines(prompt: str) -> Iterable[str]:
    """Lines typed at ``prompt`` until end of input or Ctrl-C; blank ones are skipped (nothing to send)."""
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip():
            yield line


def _keep_going(send: Any, text: str) -> None:
    """One interactive turn: a request the server refuses (a 4xx) is reported and the session goes on."""
    import openai
    try:
        send(text)
    except openai.APIStatusError as e:
        if e.status_code >= 500 or e.status_code in (401, 403, 404):  # no later turn would fare better
            raise
        print(f"error: the server answered {e.status_code}: {e.message}", file=sys.stderr)


def _run(send: Any) -> int:
    """Call ``send``; the client's errors become a message (``ValueError``), Ctrl-C stops quietly."""
    import openai
    try:
        send()
    except KeyboardInterrupt:
        print(file=sys.stderr)
    except openai.APIStatusError as e:
        raise ValueError(f"the server answered {e.status_code}: {e.message}") from None
    except openai.APIConnectionError as e:
        raise ValueError(f"lost the server: {e}") from None
    return 0


def _request_kwargs(args: argparse.Namespace, model: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": model, "stream": True}
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.stats:
        kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def cmd_chat(args: argparse.Namespace) -> int:
    """``aphrodite chat``: a conversation with the server's chat endpoint (the history is resent each turn)."""
    client, model = _connect(args)
    conversation: list[dict[str, str]] = []
    if args.system_prompt is not None:
        conversation.append({"role": "system", "content": args.system_prompt})
    kwargs = _request_kwargs(args, model)

    def turn(message: str) -> None:
        conversation.append({"role": "user", "content": message})
        try:
            stream = client.chat.completions.create(messages=conversation, **kwargs)
        except Exception:
            conversation.pop()  # refused (the conversation grew past the context, ...): the turn is not kept
            raise
        reply = print_stream(stream, lambda c: c.delta.content, args.stats)
        conversation.append({"role": "assistant", "content": reply})

    return _run(_each_line(turn, args.quick, "Please enter a message for the chat model:"))


def cmd_complete(args: argparse.Namespace) -> int:
    """``aphrodite complete``: each line is a prompt for the server's completions endpoint."""
    client, model = _connect(args)
    kwargs = _request_kwargs(args, model)

    def complete(prompt: str) -> None:
        print_stream(client.completions.create(prompt=prompt, **kwargs), lambda c: c.text, args.stats)

    return _run(_each_line(complete, args.quick, "Please enter prompt to complete:"))


def _each_line(one: Callable[[str], None], quick: str | None, banner: str) -> Callable[[], None]:
    """The session: ``one(quick)`` with -q, else ``one`` for each line typed after the banner."""
    def send() -> None:
        if quick is not None:
            one(quick)
            return
        print(banner, file=sys.stderr)
        for line in _lines("> "):
            _keep_going(one, line)
    return send
