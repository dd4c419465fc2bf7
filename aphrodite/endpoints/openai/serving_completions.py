"""``POST /v1/completions``: one engine request per prompt, answered whole or as SSE chunks."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from aphrodite.endpoints.openai.errors import OpenAIError
from aphrodite.endpoints.openai.protocol import CompletionRequest, CompletionResponse
from aphrodite.endpoints.openai.serving_common import (
    SSE_DONE,
    ChoiceCursor,
    ServingContext,
    SSEResponse,
    closer,
    merge_streams,
    new_id,
    raw_prompt_logprobs,
    sse,
    sse_error,
    stop_holdback,
    unix_now,
    unless_disconnected,
    usage,
)
from aphrodite.engine.async_engine import RequestStream
from aphrodite.outputs import Logprob, RequestOutput

_FIELDS = frozenset(CompletionRequest.model_fields)


class _Prompt:
    __slots__ = ("text", "ids", "params", "timer")

    def __init__(self, text: str | None, ids: list[int]) -> None:
        self.text = text
        self.ids = ids


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        ctx = self.ctx
        lora = ctx.check_model(request.model)
        ctx.check_stream_options(request)
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported.", param="suffix")
        items = _prompt_items(request)
        ctx.check_num_seqs(request.n, request.best_of, len(items))
        prompts = await self._prompts(items, request.truncate_prompt_tokens)
        n = request.n if request.n is not None else 1
        for p in prompts:
            # echo with max_tokens 0 (vLLM): the prompt alone, with its logprobs; one token is generated
            # and dropped, since the engine needs at least one step.
            max_tokens = ctx.max_tokens_for(1 if _echo_only(request) else request.max_tokens, len(p.ids))
            overrides: dict[str, Any] = {}
            if request.echo and request.logprobs is not None and request.prompt_logprobs is None:
                overrides["prompt_logprobs"] = request.logprobs  # echoed prompt tokens get logprobs too
            p.params = ctx.sampling_params(request, max_tokens, request.logprobs, **overrides)
            p.timer = ctx.timer(arrival)
        if request.stream and prompts[0].params.best_of > n:
            raise OpenAIError("best_of > n cannot be streamed: the best sequences are known only at the end.",
                              param="best_of")
        rid = new_id("cmpl")
        streams = await ctx.add_all([(f"{rid}-{i}", p.text, p.ids, p.params) for i, p in enumerate(prompts)],
                                    _FIELDS, lora_request=lora)
        created = unix_now()
        if request.stream:
            return SSEResponse(self._stream(request, rid, created, prompts, streams), closer(streams))
        body = await unless_disconnected(raw_request, self._full(request, rid, created, prompts, streams))
        if body is None:
            return Response(status_code=499)
        return JSONResponse(body)

    async def _prompts(self, items: list[Any], k: int | None) -> list[_Prompt]:
        out = []
        for item in items:
            if isinstance(item, str):
                ids = await self.ctx.encode(item, whole=k is not None)
                truncated = self.ctx.truncate(ids, k)
                # A cut prompt is echoed as what the model saw: its text comes from the kept ids.
                out.append(_Prompt(item if len(truncated) == len(ids) else None, truncated))
            else:
                out.append(_Prompt(None, self.ctx.truncate(list(item), k)))
        return out

    def _prompt_text(self, p: _Prompt) -> str:
        if p.text is None:
            tok = self.ctx.tokenizer
            p.text = "" if tok is None else tok.decode(p.ids)
        return p.text

    # ---- whole response ------------------------------------------------------------
    async def _full(self, request: CompletionRequest, rid: str, created: int, prompts: list[_Prompt],
                    streams: list[RequestStream]) -> dict[str, Any]:
        final: list[RequestOutput | None] = [None] * len(prompts)
        async for i, out in merge_streams(streams):
            final[i] = out
            prompts[i].timer.observe(sum(len(c.token_ids) for c in out.outputs), out.finished,
                                     out.outputs[0].finish_reason if out.outputs else None)
        n = request.n if request.n is not None else 1
        echo_only = _echo_only(request)
        choices = []
        n_prompt = n_completion = 0
        for i, (p, out) in enumerate(zip(prompts, final)):
            assert out is not None
            n_prompt += len(out.prompt_token_ids)
            for c in out.outputs:
                token_ids, entries, text = c.token_ids, c.logprobs or [], c.text
                if echo_only:
                    token_ids, entries, text = [], [], ""
                n_completion += len(token_ids)
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(token_ids, entries, request.logprobs)
                    if request.echo:
                        logprobs = _join(self._prompt_logprobs(p, out, request.logprobs), logprobs)
                if request.echo:
                    text = self._prompt_text(p) + text
                choice: dict[str, Any] = {"index": i * n + c.index, "text": text,
                                          "logprobs": logprobs, "finish_reason": c.finish_reason,
                                          "stop_reason": c.stop_reason}
                if p.params.prompt_logprobs is not None and request.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = raw_prompt_logprobs(out)
                choices.append(choice)
        response = CompletionResponse(id=rid, created=created, model=request.model, choices=choices,
                                      usage=usage(n_prompt, n_completion))
        return response.model_dump(exclude_none=False)

    # ---- streamed response ------------------------------------------------------------
    async def _stream(self, request: CompletionRequest, rid: str, created: int, prompts: list[_Prompt],
                      streams: list[RequestStream]) -> AsyncIterator[str]:
        n = request.n if request.n is not None else 1
        cursors = [ChoiceCursor() for _ in range(len(prompts) * n)]
        offsets = [0] * len(cursors)  # text_offset of the next token, per choice
        holdback = stop_holdback(prompts[0].params)
        want_lp = request.logprobs
        echo_only = _echo_only(request)
        n_prompt = [0] * len(prompts)
        n_completion = [0] * len(prompts)
        head = {"id": rid, "object": "text_completion", "created": created, "model": request.model}
        tail: dict[str, Any] = {"usage": None} if request.include_usage else {}  # OpenAI: null until the end
        try:
            async for i, out in merge_streams(streams):
                p = prompts[i]
                ntok = 0 if echo_only else sum(len(c.token_ids) for c in out.outputs)
                p.timer.observe(ntok, out.finished, out.outputs[0].finish_reason if out.outputs else None)
                for c in out.outputs:
                    idx = i * n + c.index
                    cur = cursors[idx]
                    if cur.done:
                        continue
                    prefix, prefix_lp = "", None
                    if not cur.started:
                        cur.started = True
                        if request.echo:
                            prefix = self._prompt_text(p)
                            if want_lp is not None:
                                prefix_lp = self._prompt_logprobs(p, out, want_lp)
                    text = prefix + ("" if echo_only else cur.take_text(c, holdback))
                    start, end = cur.take_tokens(c)
                    if echo_only:
                        start = end
                    finished = c.finish_reason is not None
                    lp = None
                    if want_lp is not None:
                        if prefix_lp is not None and prefix_lp["tokens"]:
                            offsets[idx] = prefix_lp["text_offset"][-1] + len(prefix_lp["tokens"][-1])
                        lp = self._logprobs(c.token_ids[start:end], (c.logprobs or [])[start:end], want_lp,
                                            offsets[idx])
                        if lp["tokens"]:
                            offsets[idx] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                        if prefix_lp is not None:
                            lp = {k: prefix_lp[k] + lp[k] for k in lp}
                    # One chunk per step that made tokens, as vLLM: also when they add no text yet (no
                    # tokenizer, a held-back stop string, a partial character), so clients can count them.
                    if not (text or end > start or finished or (lp is not None and lp["tokens"])):
                        continue
                    cur.done = finished
                    if request.continuous_usage:
                        tail = {"usage": usage(len(out.prompt_token_ids), 0 if echo_only else len(c.token_ids))}
                    yield sse({**head, "choices": [{
                        "index": idx, "text": text, "logprobs": lp,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason if finished else None}], **tail})
                if out.finished:
                    n_prompt[i] = len(out.prompt_token_ids)
                    n_completion[i] = ntok
            if request.include_usage:
                yield sse({**head, "choices": [], "usage": usage(sum(n_prompt), sum(n_completion))})
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE

    # ---- logprobs in OpenAI's completion shape ---------------------------------------------
    def _logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int,
                  offset: int = 0) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for tid, entry in zip(token_ids, entries):
            chosen = entry.get(tid)
            token = self.ctx.token_str(tid, chosen)
            tokens.append(token)
            token_logprobs.append(chosen.logprob if chosen is not None else None)
            top.append(_top_dict(entry, top_n, tid, chosen, self.ctx.token_str))
            text_offset.append(offset)
            offset += len(token)
        return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top}

    def _prompt_logprobs(self, p: _Prompt, out: RequestOutput, top_n: int) -> dict[str, Any]:
        entries = out.prompt_logprobs or []
        tokens, token_logprobs, top, text_offset, offset = [], [], [], [], 0
        for pos, tid in enumerate(p.ids):
            entry = entries[pos] if pos < len(entries) else None
            chosen = entry.get(tid) if entry else None
            token = self.ctx.token_str(tid, chosen)
            tokens.append(token)
            token_logprobs.append(chosen.logprob if chosen is not None else None)
            top.append(_top_dict(entry, top_n, tid, chosen, self.ctx.token_str) if entry else None)
            text_offset.append(offset)
            offset += len(token)
        return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top}


def _prompt_items(request: CompletionRequest) -> list[Any]:
    """The prompts of a request: texts or token-id lists."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt must not be empty.", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _echo_only(request: CompletionRequest) -> bool:
    return bool(request.echo) and request.max_tokens == 0


def _top_dict(entry: dict[int, Logprob], top_n: int, tid: int, chosen: Logprob | None,
              token_str: Any) -> dict[str, float]:
    ranked = sorted(((lp.rank or 0, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_n),
                    key=lambda x: x[0])
    top = {token_str(t, lp): lp.logprob for _, t, lp in ranked}
    if chosen is not None:
        top.setdefault(token_str(tid, chosen), chosen.logprob)  # OpenAI lists the sampled token too
    return top


def _join(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Prompt logprobs followed by completion logprobs, with offsets continuing across both."""
    base = (a["text_offset"][-1] + len(a["tokens"][-1])) if a["tokens"] else 0
    return {"text_offset": a["text_offset"] + [base + o for o in b["text_offset"]],
            "token_logprobs": a["token_logprobs"] + b["token_logprobs"], "tokens": a["tokens"] + b["tokens"],
            "top_logprobs": a["top_logprobs"] + b["top_logprobs"]}
