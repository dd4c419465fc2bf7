"""``aphrodite bench serve``: online serving benchmark against an already running server.

Flags, the printed block and the result JSON follow ``vllm bench serve``, so numbers compare
directly. Prompts are random token ids (the same ones ``bench throughput`` makes for the same
seed and lengths) sent as ``prompt`` lists to ``/v1/completions`` with ``stream: true``; each
request's TTFT, inter-token latencies and end-to-end latency are taken on the client from the
arrival of the streamed chunks, and its output tokens from the final ``usage`` chunk.
Requests go out all at once (``--request-rate inf``) or as a seeded Poisson process, through
one async HTTP client, so the client adds no per-request process or connection-pool waits.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aphrodite.benchmarks import common

if TYPE_CHECKING:
    import httpx

DEFAULT_PORT = 2242
# Assumed vocabulary when the server does not say its own: real models have at least this many.
_FALLBACK_VOCAB = 32000
_PROBE_TOKEN = 2**31 - 1
_VOCAB_IN_ERROR = re.compile(r"\[0, (\d+)\)")
_SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                   "repetition_penalty")
_METRICS = {"ttft": ("TTFT", "Time to First Token"),
            "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
            "itl": ("ITL", "Inter-token Latency"),
            "e2el": ("E2EL", "End-to-end Latency")}
_PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "generated_texts",
                "errors")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--backend", choices=["openai", "vllm"], default="openai",
                   help="Request format; both are the OpenAI completions API with streaming.")
    g.add_argument("--base-url", default=None, help="Server base URL, e.g. http://host:2242 (overrides --host/--port).")
    g.add_argument("--host", default="localhost", help="Server host (default: %(default)s).")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help="Server port (default: %(default)s).")
    g.add_argument("--endpoint", default="/v1/completions", help="Completions endpoint path (default: %(default)s).")
    g.add_argument("--model", default=None,
                   help="Model name sent in requests (default: the first model of the server's /v1/models).")
    g.add_argument("--served-model-name", default=None, help="Name sent in the model field, if not --model.")
    g.add_argument("--api-key", default=None,
                   help="Bearer key (default: $OPENAI_API_KEY, else $APHRODITE_API_KEY, else none).")
    g.add_argument("--header", metavar="KEY=VALUE", nargs="*", default=None, help="Extra headers for every request.")
    g.add_argument("--ready-check-timeout-sec", type=int, default=0,
                   help="Wait up to this long for the server to answer /v1/models first (0: no wait).")

    g = parser.add_argument_group("workload")
    g.add_argument("--dataset-name", choices=["random"], default="random",
                   help="Prompt source: random token ids (no tokenizer needed, exact lengths).")
    g.add_argument("--num-prompts", type=int, default=1000, help="Number of requests (default: %(default)s).")
    g.add_argument("--random-input-len", type=int, default=1024,
                   help="Prompt tokens per request (default: %(default)s).")
    g.add_argument("--random-output-len", type=int, default=128,
                   help="Output tokens per request (default: %(default)s).")
    g.add_argument("--input-len", type=int, default=None, help="Same as --random-input-len.")
    g.add_argument("--output-len", type=int, default=None, help="Same as --random-output-len.")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="Lengths drawn uniformly from [len*(1-r), len*(1+r)]; 0 keeps them exact.")
    g.add_argument("--random-prefix-len", type=int, default=0,
                   help="Random tokens shared by every prompt, before its own --random-input-len.")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed of the prompts and of the arrival times (default: %(default)s).")
    g.add_argument("--ignore-eos", action="store_true",
                   help="Send ignore_eos (always on for the random dataset, as in vLLM).")
    g.add_argument("--logprobs", type=int, default=None, help="Logprobs per token to request.")
    g.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into every request.")

    g = parser.add_argument_group("sampling parameters (default: the server's)")
    g.add_argument("--temperature", type=float, default=None, help="Sampling temperature; 0 is greedy.")
    g.add_argument("--top-p", type=float, default=None, help="Top-p.")
    g.add_argument("--top-k", type=int, default=None, help="Top-k.")
    g.add_argument("--min-p", type=float, default=None, help="Min-p.")
    g.add_argument("--frequency-penalty", type=float, default=None, help="Frequency penalty.")
    g.add_argument("--presence-penalty", type=float, default=None, help="Presence penalty.")
    g.add_argument("--repetition-penalty", type=float, default=None, help="Repetition penalty.")

    g = parser.add_argument_group("traffic")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="Requests per second (default: %(default)s); inf sends them all at once, else arrivals "
                   "follow a seeded Poisson process (gamma with --burstiness).")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the arrival gaps: 1 is Poisson, lower is burstier, higher more even.")
    g.add_argument("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
    g.add_argument("--num-warmups", type=int, default=0, help="Untimed requests (the first prompt) before the run.")
    g.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")

    g = parser.add_argument_group("results")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help="Metrics to report percentiles of, from ttft,tpot,itl,e2el.")
    g.add_argument("--metric-percentiles", default="99", help="Percentiles to report, e.g. 50,90,99.")
    g.add_argument("--save-result", action="store_true", help="Write the results to a JSON file.")
    g.add_argument("--save-detailed", action="store_true",
                   help="Also save per-request lists (input_lens, output_lens, ttfts, itls, latencies, ...).")
    g.add_argument("--result-dir", default=None, help="Directory of the JSON file (default: current).")
    g.add_argument("--result-filename", default=None,
                   help="Name of the JSON file (default: {label}-{rate}qps[-concurrencyN]-{model}-{date}.json); "
                   "implies --save-result.")
    g.add_argument("--label", default=None, help="Prefix of the default result filename (default: --backend).")
    g.add_argument("--metadata", metavar="KEY=VALUE", nargs="*", default=None, help="Extra fields for the JSON.")


@dataclass
class RequestResult:
    """What the client saw of one streamed request (seconds, ``perf_counter`` clock)."""

    prompt_len: int
    success: bool = False
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    generated_text: str = ""
    error: str = ""


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


# ---- setup ------------------------------------------------------------------------------
def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--{what} takes KEY=VALUE, got {item!r}.")
        out[key.strip()] = value.strip()
    return out


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {}
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("APHRODITE_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    headers.update(_key_values(args.header, "header"))
    return headers


def _validate(args: argparse.Namespace) -> None:
    if args.input_len is not None:
        args.random_input_len = args.input_len
    if args.output_len is not None:
        args.random_output_len = args.output_len
    args.ignore_eos = True  # vLLM does this for the random dataset: every request runs to its length
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1.")
    if args.random_input_len < 1 or args.random_output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be at least 1.")
    if args.random_prefix_len < 0 or not 0 <= args.random_range_ratio < 1:
        raise ValueError("--random-prefix-len must be >= 0 and --random-range-ratio in [0, 1).")
    if not args.request_rate > 0 or not args.burstiness > 0:
        raise ValueError("--request-rate and --burstiness must be positive.")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1.")
    if not args.endpoint.endswith("completions") or args.endpoint.endswith("chat/completions"):
        raise ValueError(f"--endpoint must be a text completions endpoint such as /v1/completions, "
                         f"got {args.endpoint}.")
    bad = set(args.percentile_metrics.split(",")) - set(_METRICS)
    if bad:
        raise ValueError(f"--percentile-metrics: unknown {sorted(bad)}; choose from {sorted(_METRICS)}.")


def _sample_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    """Seeded random prompts. With exact lengths and no prefix they are exactly the prompts of
    ``bench throughput --input-len L --seed S``, so the two benchmarks run the same workload."""
    n, in_len, out_len = args.num_prompts, args.random_input_len, args.random_output_len
    if args.random_range_ratio == 0 and args.random_prefix_len == 0:
        return Workload(common.random_token_prompts(n, in_len, vocab_size, args.seed), [out_len] * n)
    import numpy as np
    low, high = common.safe_token_range(vocab_size)
    rng = np.random.default_rng(args.seed)
    r = args.random_range_ratio

    def lengths(length: int) -> list[int]:
        return rng.integers(max(1, math.floor(length * (1 - r))), math.ceil(length * (1 + r)) + 1, size=n).tolist()

    in_lens, out_lens = lengths(in_len), lengths(out_len)
    prefix = rng.integers(low, high, size=args.random_prefix_len).tolist()
    prompts = [prefix + rng.integers(low, high, size=k).tolist() for k in in_lens]
    return Workload(prompts, out_lens)


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send time of each request in seconds from the start: all 0 at rate inf, else cumulative
    gamma gaps (Poisson at burstiness 1), scaled like vLLM so the last arrives at ``n / rate``
    and runs with different seeds offer the same average load."""
    if math.isinf(rate):
        return [0.0] * n
    import numpy as np
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return (times * (n / rate / times[-1])).tolist()


async def _get_json(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Any:
    response = await client.get(url, headers=headers)
    if response.status_code != 200:
        raise ValueError(f"GET {url} answered {response.status_code}: {_error_message(response.text)}")
    return response.json()


async def _served_models(client: httpx.AsyncClient, base_url: str, headers: dict[str, str],
                         ready_timeout: float) -> list[dict[str, Any]]:
    """The server's /v1/models entries, waiting up to ``ready_timeout`` for it to come up."""
    import httpx
    url = f"{base_url}/v1/models"
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            return (await _get_json(client, url, headers)).get("data") or []
        except httpx.TransportError as e:
            if time.monotonic() >= deadline:
                raise ValueError(f"no server answers at {url} ({type(e).__name__}: {e}); start one with "
                                 f"`aphrodite run` or give --base-url / --host / --port.") from None
            await asyncio.sleep(0.5)


async def _vocab_size(client: httpx.AsyncClient, api_url: str, model: str, headers: dict[str, str]) -> int:
    """The served model's vocabulary size, so random prompt ids are valid for it.

    The API has no field for it, but Aphrodite refuses an out-of-range prompt id with
    "Prompt token ids must be in [0, V)." before any work is done; other servers get a
    conservative range instead.
    """
    body = {"model": model, "prompt": [_PROBE_TOKEN], "max_tokens": 1}
    response = await client.post(api_url, json=body, headers=headers)
    match = _VOCAB_IN_ERROR.search(response.text) if response.status_code == 400 else None
    if match:
        return int(match.group(1))
    print(f"WARNING: the server did not report its vocabulary size; prompt token ids stay below "
          f"{_FALLBACK_VOCAB}.")
    return _FALLBACK_VOCAB


def _error_message(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return json.loads(text)["error"]["message"]
    return text[:500]


# ---- one request ---------------------------------------------------------------------------
async def send_request(client: httpx.AsyncClient, api_url: str, payload: dict[str, Any],
                       headers: dict[str, str], prompt_len: int) -> RequestResult:
    """Stream one completion and time its chunks, as vLLM does: every chunk with choices is a
    token arrival (TTFT for the first, an ITL gap after), the usage chunk gives the counts.
    Errors are recorded in the result, never raised."""
    result = RequestResult(prompt_len=prompt_len)
    start = last = result.start_time = time.perf_counter()
    first = True
    texts: list[str] = []
    try:
        async with client.stream("POST", api_url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {event['error'].get('message', event['error'])}"
                    return result
                if choices := event.get("choices"):
                    if first:
                        result.ttft, first = now - start, False
                    else:
                        result.itl.append(now - last)
                    last = now
                    texts.append(choices[0].get("text") or "")
                elif usage := event.get("usage"):
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_len = usage.get("prompt_tokens", prompt_len)
    except Exception as e:  # a failed request is a data point, not the end of the run
        result.error = f"{type(e).__name__}: {e}"
        return result
    if first:
        result.error = "the stream ended without a token chunk"
        return result
    result.success = True
    result.latency = last - start
    result.generated_text = "".join(texts)
    if not result.output_tokens:  # no usage chunk: one token per chunk is the best guess
        result.output_tokens = len(result.itl) + 1
    return result


# ---- metrics -------------------------------------------------------------------------------
def _stats(values: list[float], percentiles: list[float]) -> dict[str, Any]:
    """Mean, median, std and percentiles in ms; zeros for no values (vLLM's ``or 0``)."""
    import numpy as np
    a = np.asarray(values or [0.0], dtype=float) * 1000
    return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
            "percentiles": [(p, float(np.percentile(a, p))) for p in percentiles]}


def _peaks(done: list[RequestResult]) -> tuple[float, int]:
    """Most output chunks in any one-second bucket, and most requests in flight at once."""
    if not done:
        return 0.0, 0
    t0 = min(r.start_time for r in done)
    buckets: dict[int, int] = {}
    events: list[tuple[float, int]] = []
    for r in done:
        t = r.start_time + r.ttft
        for gap in [0.0, *r.itl]:
            t += gap
            buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
        events += [(r.start_time, 1), (r.start_time + r.latency, -1)]
    in_flight = peak = 0
    for _, delta in sorted(events):  # an end sorts before a start at the same instant
        in_flight += delta
        peak = max(peak, in_flight)
    return float(max(buckets.values())), peak


def compute_metrics(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict[str, Any]:
    """vLLM's serving metrics over the successful requests; TPOT is per request
    ``(latency - ttft) / (output_tokens - 1)``, ITL every gap of every request."""
    done = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    per_metric = {
        "ttft": [r.ttft for r in done],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    peak_tokens, peak_requests = _peaks(done)
    return {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
        "stats": {name: _stats(values, percentiles) for name, values in per_metric.items()},
    }


def _row(label: str, value: Any, fmt: str = "") -> None:
    print(f"{label:<40} {value:<10{fmt}}")


def print_results(m: dict[str, Any], metrics: list[str], max_concurrency: int | None, rate: float) -> None:
    """The block of ``vllm bench serve``, line for line."""
    print("{:=^50}".format(" Serving Benchmark Result "))
    _row("Successful requests:", m["completed"])
    _row("Failed requests:", m["failed"])
    if max_concurrency is not None:
        _row("Maximum request concurrency:", max_concurrency)
    if not math.isinf(rate):
        _row("Request rate configured (RPS):", rate, ".2f")
    _row("Benchmark duration (s):", m["duration"], ".2f")
    _row("Total input tokens:", m["total_input_tokens"])
    _row("Total generated tokens:", m["total_output_tokens"])
    _row("Request throughput (req/s):", m["request_throughput"], ".2f")
    _row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
    _row("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"], ".2f")
    _row("Peak concurrent requests:", float(m["max_concurrent_requests"]), ".2f")
    _row("Total Token throughput (tok/s):", m["total_token_throughput"], ".2f")
    for name in metrics:
        short, title = _METRICS[name]
        s = m["stats"][name]
        print(f"{title:-^50}")
        _row(f"Mean {short} (ms):", s["mean"], ".2f")
        _row(f"Median {short} (ms):", s["median"], ".2f")
        for p, value in s["percentiles"]:
            _row(f"P{int(p) if p == int(p) else p} {short} (ms):", value, ".2f")
    print("=" * 50, flush=True)


# ---- the run -------------------------------------------------------------------------------
async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_url = base_url + args.endpoint
    headers = _headers(args)
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(6 * 3600.0), limits=limits) as client:
        models = await _served_models(client, base_url, headers, args.ready_check_timeout_sec)
        model_id = args.model
        if model_id is None:
            if not models:
                raise ValueError(f"{base_url}/v1/models lists no model; give --model.")
            model_id = models[0]["id"]
            print(f"Model not specified, using the server's first model: {model_id}")
        model_name = args.served_model_name or model_id
        card = next((m for m in models if m.get("id") == model_name), {})
        need = args.random_prefix_len + math.ceil(args.random_input_len * (1 + args.random_range_ratio)) + \
            math.ceil(args.random_output_len * (1 + args.random_range_ratio))
        if card.get("max_model_len") and need > card["max_model_len"]:
            raise ValueError(f"prompt + output lengths ({need}) exceed the server's max_model_len "
                             f"({card['max_model_len']}).")

        workload = _sample_workload(args, await _vocab_size(client, api_url, model_name, headers))
        body: dict[str, Any] = {"model": model_name, "stream": True, "stream_options": {"include_usage": True},
                                "ignore_eos": args.ignore_eos}
        if args.logprobs is not None:
            body["logprobs"] = args.logprobs
        sampling = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k) is not None}
        if "temperature" not in sampling:
            print("Temperature not given: the server's default applies (vLLM's bench serve sends none either; "
                  "--temperature 0 is greedy).")
        body.update(sampling)
        body.update(args.extra_body or {})

        def payload(i: int) -> dict[str, Any]:
            return {**body, "prompt": workload.prompts[i], "max_tokens": workload.output_lens[i]}

        if args.num_warmups > 0:
            print(f"Warming up with {args.num_warmups} requests...")
            warm = await asyncio.gather(*(send_request(client, api_url, payload(0), headers, 0)
                                          for _ in range(args.num_warmups)))
            if not any(r.success for r in warm):
                raise ValueError(f"every warm-up request failed: {warm[0].error}")

        print(f"Traffic request rate: {args.request_rate}")
        shape = "Poisson process" if args.burstiness == 1 else "Gamma distribution"
        print(f"Burstiness factor: {args.burstiness} ({shape})")
        print(f"Maximum request concurrency: {args.max_concurrency}", flush=True)
        pbar = None
        if not args.disable_tqdm:
            from tqdm.auto import tqdm
            pbar = tqdm(total=len(workload.prompts))
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()

        async def one(i: int) -> RequestResult:
            async with gate:
                result = await send_request(client, api_url, payload(i), headers, len(workload.prompts[i]))
            if pbar is not None:
                pbar.update(1)
            return result

        times = arrival_times(len(workload.prompts), args.request_rate, args.burstiness, args.seed)
        tasks = []
        start = time.perf_counter()
        for i, at in enumerate(times):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()

    failed = [r for r in results if not r.success]
    if failed:
        print(f"{len(failed)} requests failed (showing up to 10):")
        for r in failed[:10]:
            print(f"  {r.error}")
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    metrics = compute_metrics(results, duration, percentiles)
    print_results(metrics, args.percentile_metrics.split(","), args.max_concurrency, args.request_rate)
    return _result_json(args, model_id, metrics, results)


def _result_json(args: argparse.Namespace, model_id: str, m: dict[str, Any],
                 results: list[RequestResult]) -> dict[str, Any]:
    """vLLM's result JSON: the setup, the totals, ``mean_/median_/std_/pNN_<metric>_ms``, and
    (``--save-detailed``) the per-request lists."""
    out: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "label": args.label,
        "model_id": model_id, "tokenizer_id": None, "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        **_key_values(args.metadata, "metadata"),
    }
    out.update({k: v for k, v in m.items() if k != "stats"})
    for name, s in m["stats"].items():
        out[f"mean_{name}_ms"], out[f"median_{name}_ms"], out[f"std_{name}_ms"] = s["mean"], s["median"], s["std"]
        for p, value in s["percentiles"]:
            out[f"p{int(p) if p == int(p) else p}_{name}_ms"] = value
    if args.save_detailed:
        out.update(input_lens=[r.prompt_len for r in results],
                   output_lens=[r.output_tokens if r.success else 0 for r in results],
                   ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                   latencies=[r.latency for r in results], start_times=[r.start_time for r in results],
                   generated_texts=[r.generated_text for r in results], errors=[r.error for r in results])
    return out


def _result_path(args: argparse.Namespace, result: dict[str, Any]) -> str:
    name = args.result_filename
    if name is None:
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
        model = str(result["model_id"]).rstrip("/").split("/")[-1]
        name = f"{args.label or args.backend}-{args.request_rate}qps{concurrency}-{model}-{result['date']}.json"
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    return name


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark, print vLLM's block and return the result JSON (written by --save-result)."""
    _validate(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    result = asyncio.run(_run(args))
    if args.save_result or args.result_filename:
        path = _result_path(args, result)
        with open(path, "w") as f:
            json.dump(result, f)
        print(f"Results written to {path}")
    return result
