"""``POST /v1/chat/completions``: render the chat template, generate, answer whole or as deltas."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from aphrodite.endpoints.openai.errors import OpenAIError, from_value_error
from aphrodite.endpoints.openai.metrics import RequestTimer
from aphrodite.endpoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionTool,
    ChatMessage,
)
from aphrodite.endpoints.openai.reasoning import REASONING_PARSERS
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
from aphrodite.endpoints.openai.tool_parsers import TOOL_PARSERS
from aphrodite.endpoints.openai.tools import ChoiceOutput, ToolPlan
from aphrodite.engine.async_engine import RequestStream
from aphrodite.outputs import CompletionOutput, RequestOutput

_FIELDS = frozenset(ChatCompletionRequest.model_fields)


async def render_chat(ctx: ServingContext, messages: list[ChatMessage], *, chat_template: str | None,
                      add_generation_prompt: bool, continue_final_message: bool,
                      chat_template_kwargs: dict[str, Any] | None,
                      tools: list[ChatCompletionTool] | None = None) -> str:
    """The prompt text of a conversation, rendered on a worker thread; a 400 for anything the template or
    the messages get wrong, and for a request's own template unless the server trusts them (vLLM's
    ``--trust-request-chat-template``), which then renders within ``REQUEST_TEMPLATE_BUDGET_S``."""
    from aphrodite.tokenization.chat_template import REQUEST_TEMPLATE_BUDGET_S, apply_chat_template
    ctx.need_tokenizer()
    budget = None
    if chat_template is not None:
        if not ctx.trust_request_chat_template:
            raise OpenAIError("This request sets chat_template, but the server does not accept templates from "
                              "requests; start it with --trust-request-chat-template to allow them.",
                              param="chat_template")
        budget = REQUEST_TEMPLATE_BUDGET_S
    conversation = [m.model_dump(exclude_none=True) for m in messages]
    tool_dicts = [t.model_dump() for t in tools] if tools else None  # as vLLM passes them, nulls too
    try:
        return await ctx.workers.run(
            lambda: apply_chat_template(
                ctx.workers.tokenizer(), conversation,
                chat_template=chat_template if chat_template is not None else ctx.chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs, tools=tool_dicts, time_budget_s=budget))
    except ValueError as e:
        raise from_value_error(e, _FIELDS) from None


class ChatServing:
    """``enable_auto_tools``/``tool_parser``/``reasoning_parser``: vLLM's ``--enable-auto-tool-choice``,
    ``--tool-call-parser`` and ``--reasoning-parser``."""

    def __init__(self, ctx: ServingContext, *, enable_auto_tools: bool = False, tool_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:
        if enable_auto_tools and not tool_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser.")
        for flag, name, known in (("--tool-call-parser", tool_parser, TOOL_PARSERS),
                                  ("--reasoning-parser", reasoning_parser, REASONING_PARSERS)):
            if name and name not in known:
                raise ValueError(f"Unknown {flag} {name!r}; choose from {', '.join(sorted(known))}.")
        self.ctx = ctx
        self.enable_auto_tools = enable_auto_tools
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        ctx = self.ctx
        lora = ctx.check_model(request.model)
        ctx.check_stream_options(request)
        ctx.check_num_seqs(request.n, request.best_of)
        plan = ToolPlan.for_request(request, enable_auto_tools=self.enable_auto_tools, tool_parser=self.tool_parser,
                                    reasoning_parser=self.reasoning_parser, tokenizer=ctx.tokenizer)
        prompt = await render_chat(ctx, request.messages, chat_template=request.chat_template,
                             add_generation_prompt=request.add_generation_prompt,
                             continue_final_message=request.continue_final_message,
                             chat_template_kwargs=request.chat_template_kwargs, tools=request.tools)
        plan.see_prompt(prompt)
        # The template already holds the BOS token where the model wants one.
        ids = await ctx.encode(prompt, add_special_tokens=False, whole=request.truncate_prompt_tokens is not None,
                               prompt_name="messages")
        if request.truncate_prompt_tokens is not None:
            ids = ctx.truncate(ids, request.truncate_prompt_tokens)
            prompt = ctx.tokenizer.decode(ids)
        if request.max_completion_tokens is not None:
            max_tokens = ctx.max_tokens_for(request.max_completion_tokens, len(ids), "max_completion_tokens")
        else:
            max_tokens = ctx.max_tokens_for(request.max_tokens, len(ids), prompt_name="messages")
        logprobs = None
        if request.logprobs:
            logprobs = request.top_logprobs or 0
        elif request.top_logprobs:
            raise OpenAIError("top_logprobs needs logprobs set to true.", param="top_logprobs")
        overrides: dict[str, Any] = {}
        if (constraint := plan.structured_outputs(request)) is not None:
            overrides["structured_outputs"] = constraint
        if plan.keep_special_tokens:
            overrides["skip_special_tokens"] = False
        try:
            params = ctx.sampling_params(request, max_tokens, logprobs, **overrides)
        except OpenAIError as e:
            if e.param == "max_tokens" and request.max_completion_tokens is not None:
                e.param = "max_completion_tokens"  # the field this request set
                e.message = e.message.replace("max_tokens", "max_completion_tokens", 1)
            raise
        n = params.n
        if request.stream and params.best_of > n:
            raise OpenAIError("best_of > n cannot be streamed: the best sequences are known only at the end.",
                              param="best_of")
        rid = new_id("chatcmpl")
        try:
            streams = await ctx.add_all([(rid, prompt, ids, params)], _FIELDS, lora_request=lora)
        except OpenAIError as e:
            if e.param == "logprobs" and request.top_logprobs is not None:
                e.param = "top_logprobs"  # the engine's name for what chat calls top_logprobs
            raise
        timer = ctx.timer(arrival)
        created = unix_now()
        if request.stream:
            return SSEResponse(self._stream(request, plan, rid, created, n, stop_holdback(params), len(ids),
                                            streams, timer), closer(streams))
        body = await unless_disconnected(raw_request, self._full(request, plan, rid, created, streams[0], timer))
        if body is None:
            return Response(status_code=499)
        return JSONResponse(body)

    async def _full(self, request: ChatCompletionRequest, plan: ToolPlan, rid: str, created: int,
                    stream: RequestStream, timer: RequestTimer) -> dict[str, Any]:
        final: RequestOutput | None = None
        async for _, out in merge_streams([stream]):
            final = out
            timer.observe(_num_tokens(out), out.finished, _reason(out))
        assert final is not None
        choices = []
        for c in final.outputs:
            out = plan.new_choice()
            choices.append({
                "index": c.index, "message": out.message(self.ctx.response_role, c.text),
                "logprobs": self._logprobs(c, 0, len(c.token_ids), request.top_logprobs or 0)
                if request.logprobs else None,
                "finish_reason": out.finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
        response = ChatCompletionResponse(
            id=rid, created=created, model=request.model, choices=choices,
            usage=usage(len(final.prompt_token_ids), _num_tokens(final)),
            prompt_logprobs=raw_prompt_logprobs(final) if request.prompt_logprobs is not None else None)
        return response.model_dump()

    async def _stream(self, request: ChatCompletionRequest, plan: ToolPlan, rid: str, created: int, n: int,
                      holdback: int, prompt_len: int, streams: list[RequestStream],
                      timer: RequestTimer) -> AsyncIterator[str]:
        head: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": request.model}
        tail: dict[str, Any] = {"usage": None} if request.include_usage else {}  # OpenAI: null until the end

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None,
                  stop_reason: Any = None, completion_tokens: int = 0) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = stop_reason
            if request.continuous_usage:  # vLLM's continuous_usage_stats: this choice's counts so far
                return sse({**head, "choices": [choice], "usage": usage(prompt_len, completion_tokens)})
            return sse({**head, "choices": [choice], **tail})

        cursors = [ChoiceCursor() for _ in range(n)]
        outs: list[ChoiceOutput] = [plan.new_choice() for _ in range(n)]
        texts = [""] * n  # each choice's text so far, for the parsers (not kept when there are none)
        top_n = request.top_logprobs or 0
        final: RequestOutput | None = None
        try:
            # The role comes first, before any token: clients show the turn as started.
            for i in range(n):
                yield chunk(i, {"role": self.ctx.response_role, "content": ""})
            async for _, out in merge_streams(streams):
                final = out
                timer.observe(_num_tokens(out), out.finished, _reason(out))
                for c in out.outputs:
                    cur = cursors[c.index]
                    if cur.done:
                        continue
                    text = cur.take_text(c, holdback)
                    start, end = cur.take_tokens(c)
                    lp = self._logprobs(c, start, end, top_n) if request.logprobs and end > start else None
                    out = outs[c.index]
                    if out.plain:
                        deltas = [{"content": text}] if text else []
                    else:
                        texts[c.index] += text
                        deltas = out.deltas(texts[c.index], c.finish_reason is not None)
                    if not deltas and lp is not None:
                        deltas = [{"content": ""}]  # the tokens' logprobs go out even while a parser holds text
                    for k, delta in enumerate(deltas):
                        yield chunk(c.index, delta, lp if k == 0 else None, completion_tokens=end)
                    if c.finish_reason is not None:
                        cur.done = True
                        yield chunk(c.index, {}, None, out.finish_reason(c.finish_reason), c.stop_reason,
                                    completion_tokens=end)
            if request.include_usage and final is not None:
                yield sse({**head, "choices": [],
                           "usage": usage(len(final.prompt_token_ids), _num_tokens(final))})
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE

    def _logprobs(self, c: CompletionOutput, start: int, end: int, top_n: int) -> dict[str, Any]:
        """Chat-shaped logprobs of positions [start, end) of one choice."""
        content = []
        entries = c.logprobs or []
        for tid, entry in zip(c.token_ids[start:end], entries[start:end]):
            chosen = entry.get(tid)
            token = self.ctx.token_str(tid, chosen)
            top = sorted((lp.rank, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_n)
            content.append({
                "token": token, "logprob": chosen.logprob if chosen is not None else float("-inf"),
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [{"token": (s := self.ctx.token_str(t, lp)), "logprob": lp.logprob,
                                  "bytes": list(s.encode("utf-8"))} for _, t, lp in top]})
        return {"content": content}


def _num_tokens(out: RequestOutput) -> int:
    return sum(len(c.token_ids) for c in out.outputs)


def _reason(out: RequestOutput) -> str | None:
    return out.outputs[0].finish_reason if out.outputs else None
