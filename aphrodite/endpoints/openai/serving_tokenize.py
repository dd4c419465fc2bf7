"""``POST /v1/tokenize`` and ``/v1/detokenize``: the server's tokenizer and chat template, for clients
that count tokens or build prompts themselves."""
from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

from aphrodite.endpoints.openai.errors import OpenAIError
from aphrodite.endpoints.openai.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest
from aphrodite.endpoints.openai.serving_chat import render_chat
from aphrodite.endpoints.openai.serving_common import ServingContext
from aphrodite.endpoints.openai.workers import decode

_SLICE = 1 << 16  # list items serialized per call, so the GIL changes hands between slices


def json_body(fields: dict[str, Any]) -> bytes:
    """``json.dumps(fields)``, built slice by slice: one ``dumps`` of millions of ids would hold the GIL
    (and with it the event loop) for a quarter of a second. Runs on a worker thread."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, list) and len(value) > _SLICE:
            items = ",".join(json.dumps(value[i:i + _SLICE], ensure_ascii=False)[1:-1]
                             for i in range(0, len(value), _SLICE))
            parts.append(f"{json.dumps(key)}:[{items}]")
        else:
            parts.append(f"{json.dumps(key)}:{json.dumps(value, ensure_ascii=False)}")
    return ("{" + ",".join(parts) + "}").encode()


async def tokenize(ctx: ServingContext, request: TokenizeRequest) -> Response:
    ctx.check_model(request.model, required=False)
    if request.messages is not None:
        text = await render_chat(ctx, request.messages, chat_template=request.chat_template,
                                 add_generation_prompt=request.add_generation_prompt,
                                 continue_final_message=request.continue_final_message,
                                 chat_template_kwargs=request.chat_template_kwargs, tools=request.tools)
        add_special = bool(request.add_special_tokens)  # the template holds the special tokens already
    else:
        text = request.prompt
        add_special = request.add_special_tokens is None or request.add_special_tokens
    ids = await ctx.encode(text, add_special_tokens=add_special, whole=True)

    def body() -> bytes:
        fields: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}
        if request.return_token_strs:
            fields["token_strs"] = ctx.workers.tokenizer().convert_ids_to_tokens(ids)
        return json_body(fields)
    return Response(await ctx.workers.run(body), media_type="application/json")


async def detokenize(ctx: ServingContext, request: DetokenizeRequest) -> DetokenizeResponse:
    ctx.check_model(request.model, required=False)
    ctx.need_tokenizer()

    def text() -> str:  # on a worker thread: the ids may number millions
        tok = ctx.workers.tokenizer()
        vocab = len(tok)
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"tokens must be ids in [0, {vocab}), got {bad[:5]}.", param="tokens")
        return decode(tok, request.tokens)
    return DetokenizeResponse(prompt=await ctx.workers.run(text))
