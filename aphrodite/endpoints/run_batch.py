"""``aphrodite run-batch``: an OpenAI Batch API file through the server's own handlers, offline
(vLLM's ``vllm run-batch``).

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body"}``. Every body goes to the same FastAPI app ``aphrodite run`` serves (built by ``build_app``,
called in-process through ASGI, no socket): the same validation, 400/404 error bodies, chat templates
and sampling as over HTTP. Up to twice ``max_num_seqs`` requests are in flight at once, so the engine
batches them; lines are read as they are needed, and at most a fixed multiple of that read ahead of the
last one written, so a file of any size runs in bounded memory. A body's ``model`` may name a
``--lora-modules`` adapter. Each output line is ``{"id": "vllm-...", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``, in input order; a line that fails (bad JSON, unknown URL, a 4xx from
the handler) gets its error there and the others still run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import IO, Any

logger = logging.getLogger("aphrodite.endpoints.run_batch")

__all__ = ["SUPPORTED_URLS", "add_cli_args", "main", "run_batch"]

SUPPORTED_URLS = ("/v1/chat/completions", "/v1/completions")
_UPLOAD_RETRIES = 5
_UPLOAD_RETRY_DELAY_S = 5.0
# Lines read but not yet written, per request in flight: bounds the memory a slow line holds back (the lines
# after it finish and wait for it) while the others keep the engine busy.
_UNWRITTEN_PER_IN_FLIGHT = 8
_BAR_FORMAT = "{desc}: {n_fmt} done [{elapsed}, {rate_fmt}]\n"  # plain lines: no animation in logs


def add_cli_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The batch runner's own flags (vLLM's names); the engine's come from ``EngineArgs.add_cli_args``."""
    add = parser.add_argument
    add("-i", "--input-file", required=True, default=argparse.SUPPRESS, metavar="INPUT",
        help="Batch input: a JSONL file, - for stdin, or an http(s) URL to GET.")
    add("-o", "--output-file", required=True, default=argparse.SUPPRESS, metavar="OUTPUT",
        help="Batch output: a JSONL file, - for stdout, or an http(s) URL to PUT the file to once done.")
    add("--output-tmp-dir", default=None, metavar="DIR",
        help="With an http(s) output: where the file is written before the upload. (default: the system's)")
    add("--served-model-name", nargs="+", default=None, metavar="NAME",
        help="Name(s) the bodies' model field may use. (default: the model)")
    add("--lora-modules", nargs="+", default=None, metavar="NAME=PATH", type=_lora_module,
        help="LoRA adapters a body's model field may name (with --enable-lora), as the server takes them: "
             "NAME=PATH or JSON {\"name\", \"path\", \"base_model_name\"}.")
    add("--response-role", default="assistant", help="Role of generated chat messages. (default: assistant)")
    add("--chat-template", default=None, metavar="FILE|URL|JINJA",
        help="Chat template for /v1/chat/completions lines. (default: the tokenizer's)")
    add("--trust-request-chat-template", action="store_true", default=False,
        help="Accept a chat_template in a line's body (refused with a 400 otherwise).")
    from aphrodite.endpoints.openai.tools import add_tool_args
    add_tool_args(add)  # the server's --reasoning-parser (vLLM's run-batch has it) and tool-call flags
    add("--enable-log-requests", action="store_true", default=False, help="Log each request at INFO.")
    add("--max-log-len", type=int, default=None, metavar="N",
        help="With --enable-log-requests: log at most N prompt characters and token ids. (default: unlimited)")
    add("--enable-metrics", action="store_true", default=False,
        help="Serve Prometheus metrics (the server's aphrodite:* names) while the batch runs.")
    add("--url", default="0.0.0.0", help="Address of the metrics server (with --enable-metrics). (default: 0.0.0.0)")
    add("--port", type=int, default=8000, help="Port of the metrics server (with --enable-metrics). (default: 8000)")


def _lora_module(value: str) -> Any:
    from aphrodite.endpoints.openai.serving_lora import parse_lora_module
    return parse_lora_module(value)


# ---- input and output ------------------------------------------------------------------------
def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def _open_input(path: str) -> IO[str]:
    """The input as a text stream: a local file, stdin (``-``) or the body of a GET of an http(s) URL."""
    if path == "-":
        return sys.stdin
    try:
        if _is_url(path):
            return io.TextIOWrapper(urllib.request.urlopen(path, timeout=300), encoding="utf-8-sig")  # noqa: S310
        return open(path, encoding="utf-8-sig")  # noqa: SIM115 (a BOM is skipped)
    except OSError as e:
        raise ValueError(f"Cannot read the batch input {path}: {e.strerror or e}") from None


def read_lines(path: str) -> Iterator[str]:
    """The non-blank lines of a local file, stdin (``-``) or an http(s) URL, read as they are asked for (a
    file of any size): the input is opened here, so a bad one fails at once."""
    stream = _open_input(path)

    def lines() -> Iterator[str]:
        try:
            for line in stream:
                if line.strip():
                    yield line.strip()
        except OSError as e:  # the connection broke
            raise ValueError(f"Cannot read the batch input {path}: {e}") from None
        finally:
            if stream is not sys.stdin:
                stream.close()
    return lines()


def upload(url: str, path: str, retries: int = _UPLOAD_RETRIES, delay: float = _UPLOAD_RETRY_DELAY_S) -> None:
    """PUT the file at ``path`` to ``url`` (vLLM's upload: retried, since big uploads time out)."""
    for attempt in range(1, retries + 1):
        try:
            with open(path, "rb") as f:  # streamed from the file: the output may be larger than memory
                req = urllib.request.Request(url, data=f, method="PUT", headers={
                    "Content-Type": "application/jsonl", "Content-Length": str(os.fstat(f.fileno()).st_size)})
                with urllib.request.urlopen(req, timeout=1000) as resp:  # noqa: S310
                    if resp.status // 100 != 2:
                        raise OSError(f"status {resp.status}")
            return
        except OSError as e:
            if attempt == retries:
                raise ValueError(f"Cannot upload the batch output to {url} after {attempt} attempts: {e}") from None
            logger.error("Uploading the batch output failed (attempt %d: %s); retrying in %g s", attempt, e, delay)
            time.sleep(delay)


class OrderedWriter:
    """Writes outputs in input order as they complete: a line waits only for those before it."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.next = 0
        self.pending: dict[int, dict[str, Any]] = {}
        self.written = 0

    def add(self, index: int, line: dict[str, Any]) -> int:
        """Keep line ``index``; write it and those after it that are ready; returns how many were written."""
        self.pending[index] = line
        before = self.written
        while self.next in self.pending:
            self.out.write(json.dumps(self.pending.pop(self.next), ensure_ascii=False, separators=(",", ":")) + "\n")
            self.next += 1
            self.written += 1
        self.out.flush()
        return self.written - before


@contextlib.contextmanager
def open_output(path: str, tmp_dir: str | None = None, stdout: IO[str] | None = None) -> Iterator[IO[str]]:
    """A text stream for the output: the file, ``stdout`` (default ``sys.stdout``) for ``-``, or a
    temporary file that is uploaded (HTTP PUT) to an http(s) URL once the batch is done."""
    if path == "-":
        out = stdout or sys.stdout
        yield out
        out.flush()
    elif _is_url(path):
        fd, tmp = tempfile.mkstemp(prefix="tmp_batch_output_", suffix=".jsonl", dir=tmp_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                logger.info("Writing outputs to temporary local file %s", tmp)
                yield f
            logger.info("Uploading outputs to %s", path)
            upload(path, tmp)
        finally:
            os.unlink(tmp)
    else:
        try:
            f = open(path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise ValueError(f"Cannot write the batch output {path}: {e.strerror or e}") from None
        with f:
            yield f


# ---- one line ------------------------------------------------------------------------------
def _random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def output_line(custom_id: Any, status: int = HTTPStatus.OK, body: Any = None, error: Any = None) -> dict[str, Any]:
    """One output line in the Batch API's shape (vLLM's ``BatchRequestOutput``)."""
    return {"id": _random_id("vllm"), "custom_id": custom_id,
            "response": {"status_code": int(status), "request_id": _random_id("vllm-batch"), "body": body},
            "error": error}


def parse_line(line: str) -> tuple[Any, str, bytes]:
    """(custom_id, url, body as JSON bytes) of an input line; ``ValueError`` says what is wrong, with
    the custom_id as its second argument when the line has one."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"The line is not valid JSON: {e}", None) from None
    if not isinstance(obj, dict):
        raise ValueError("The line must be a JSON object with custom_id, method, url and body.", None)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str):
        raise ValueError("custom_id must be a string.", custom_id)
    method, url, body = obj.get("method"), obj.get("url"), obj.get("body")
    if not isinstance(url, str):
        raise ValueError("url must be a string.", custom_id)
    if not isinstance(method, str) or method.upper() != "POST":
        raise ValueError(f"method must be POST, got {method!r}.", custom_id)
    if url not in SUPPORTED_URLS:
        raise ValueError(f"URL {url} was used. Supported endpoints: {', '.join(SUPPORTED_URLS)}.", custom_id)
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object (the request of the url).", custom_id)
    if body.get("stream"):
        raise ValueError("Request must not be sent in stream mode.", custom_id)
    return custom_id, url, json.dumps(body).encode()


async def call_app(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, bytes]:
    """POST ``body`` to ``path`` of the ASGI ``app`` in this process; returns (status, response body).

    The client never leaves: ``receive`` reports a disconnect only once the response is complete."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers],
             "client": ("127.0.0.1", 0), "server": ("aphrodite-run-batch", 0)}
    done = asyncio.Event()
    body_sent = False
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return int(status), b"".join(chunks)


async def run_line(app: Any, line: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The output line of one input line: the handler's answer, or the reason it could not run."""
    try:
        custom_id, url, body = parse_line(line)
    except ValueError as e:
        return output_line(e.args[1], HTTPStatus.BAD_REQUEST, error=e.args[0])
    try:
        status, raw = await call_app(app, url, body, headers)
        answer = json.loads(raw) if raw else None
    except Exception as e:  # noqa: BLE001 (one line's failure must not stop the batch)
        logger.exception("Batch request %s failed", custom_id)
        return output_line(custom_id, HTTPStatus.INTERNAL_SERVER_ERROR, error=f"{type(e).__name__}: {e}")
    if status == HTTPStatus.OK:
        return output_line(custom_id, status, body=answer)
    return output_line(custom_id, status, error=answer)


# ---- the batch -------------------------------------------------------------------------------
def _server_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The options ``build_app`` reads; the rest keep the server's defaults (no auth flags: a batch
    has no clients to keep out, so nothing but ``APHRODITE_API_KEY`` turns the key check on)."""
    names = ("served_model_name", "lora_modules", "response_role", "enable_auto_tool_choice", "tool_call_parser",
             "reasoning_parser", "enable_log_requests", "max_log_len",
             "trust_request_chat_template", "disable_log_stats")
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return argparse.Namespace(**values, api_keys=None, max_request_body_bytes=sys.maxsize)


async def run_batch(engine: Any, args: argparse.Namespace, chat_template: str | None = None,
                    stdout: IO[str] | None = None, lines: Iterable[str] | None = None) -> tuple[int, int]:
    """Run every line of ``args.input_file`` (or of the iterable ``lines``) on ``engine`` (an ``AsyncLLMEngine``,
    started here, after ``--lora-modules`` load, if it is not running yet) and write the outputs to
    ``args.output_file`` (``stdout`` for ``-``); returns (lines, lines answered 200)."""
    from tqdm import tqdm

    from aphrodite.endpoints.openai.api_server import build_app
    app = build_app(engine, _server_namespace(args), chat_template)  # loads --lora-modules: before the engine runs
    engine.start()
    key = os.environ.get("APHRODITE_API_KEY")  # build_app turns the key check on from the environment
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    if getattr(args, "enable_metrics", False):
        from prometheus_client import start_http_server
        start_http_server(port=args.port, addr=args.url, registry=app.state.ctx.metrics.registry)
        logger.info("Prometheus metrics at http://%s:%d/metrics", args.url, args.port)
    in_flight = 2 * engine.config.scheduler.max_num_seqs
    limit = asyncio.Semaphore(in_flight)  # enough to fill every step
    room = asyncio.Semaphore(_UNWRITTEN_PER_IN_FLIGHT * in_flight)  # read, not yet written
    tasks: set[asyncio.Task] = set()
    ok = total = 0
    logger.info("Reading batch from %s", args.input_file)
    async with app.router.lifespan_context(app):  # periodic stats logging; request workers stopped at the end
        with open_output(args.output_file, args.output_tmp_dir, stdout) as out, \
                tqdm(unit="req", desc="Running batch", mininterval=5, bar_format=_BAR_FORMAT) as bar:
            writer = OrderedWriter(out)

            async def one(index: int, line: str) -> None:
                nonlocal ok
                try:
                    result = await run_line(app, line, headers)
                finally:
                    limit.release()
                ok += result["response"]["status_code"] == HTTPStatus.OK
                for _ in range(writer.add(index, result)):
                    room.release()
                bar.update()

            source = iter(lines) if lines is not None else read_lines(args.input_file)
            loop = asyncio.get_running_loop()
            slow_input = lines is None and (args.input_file == "-" or _is_url(args.input_file))
            while True:
                await room.acquire()
                await limit.acquire()
                # stdin and URLs may come slowly: read them off the loop, so finished requests are written meanwhile
                line = (await loop.run_in_executor(None, next, source, None) if slow_input else next(source, None))
                if line is None:
                    limit.release()
                    break
                task = asyncio.ensure_future(one(total, line))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                total += 1
            logger.info("All %d requests submitted, waiting for them to finish", total)
            while tasks:
                await asyncio.gather(*list(tasks))
    logger.info("Batch done: %d requests, %d succeeded, %d failed; output in %s", total, ok, total - ok,
                args.output_file)
    return total, ok


def main(args: argparse.Namespace) -> int:
    """``aphrodite run-batch``: load the engine, run the batch, stop the engine; 0 once every line has
    an output line (failed requests included: their errors are in the output)."""
    try:
        from aphrodite.endpoints.openai.api_server import engine_args_from
    except ImportError as e:
        raise ValueError(f"run-batch uses the server's handlers: pip install aphrodite[server] ({e}).") from e
    from aphrodite.engine.async_engine import AsyncLLMEngine
    from aphrodite.tokenization.chat_template import load_chat_template
    engine_args = engine_args_from(args)
    chat_template = load_chat_template(args.chat_template)
    if not _is_url(args.input_file) and args.input_file != "-" and not os.path.isfile(args.input_file):
        raise ValueError(f"The batch input {args.input_file} does not exist.")
    if _is_url(args.input_file):  # tried before the model loads, so a bad one fails at once; read as it runs
        _open_input(args.input_file).close()
    out_dir = os.path.dirname(os.path.abspath(args.output_file))
    if not _is_url(args.output_file) and args.output_file != "-" and not os.path.isdir(out_dir):
        raise ValueError(f"The folder of the batch output {args.output_file} does not exist.")
    # With -o -, stdout carries the outputs alone: anything else printed goes to stderr.
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.output_file == "-" else real_stdout):
        engine = AsyncLLMEngine.from_engine_args(engine_args, start=False, usage_context="llm")
        try:
            asyncio.run(run_batch(engine, args, chat_template, stdout=real_stdout))
        finally:
            engine.shutdown()
    return 0
