"""``POST /v1/tokenize`` and ``/v1/detokenize``: the server's tokenizer and chat template, for clients
that count tokens or build prompts themselves."""
from __future__ import annotations

from aphrodite.endpoints.openai.errors import OpenAIError
from aphrodite.endpoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from aphrodite.endpoints.openai.serving_chat import render_chat
from aphrodite.endpoints.openai.serving_common import ServingContext


def tokenize(ctx: ServingContext, request: TokenizeRequest) -> TokenizeResponse:
    ctx.check_model(request.model, required=False)
    if (request.prompt is None) == (request.messages is None):
        raise OpenAIError("Give exactly one of prompt or messages.", param="prompt")
    if request.messages is not None:
        text = render_chat(ctx, request.messages, chat_template=request.chat_template,
                           add_generation_prompt=request.add_generation_prompt,
                           continue_final_message=request.continue_final_message,
                           chat_template_kwargs=request.chat_template_kwargs)
        add_special = bool(request.add_special_tokens)  # the template holds the special tokens already
    else:
        text = request.prompt
        add_special = request.add_special_tokens is None or request.add_special_tokens
    ids = ctx.encode(text, add_special_tokens=add_special)
    strs = ctx.need_tokenizer().convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len, token_strs=strs)


def detokenize(ctx: ServingContext, request: DetokenizeRequest) -> DetokenizeResponse:
    ctx.check_model(request.model, required=False)
    tok = ctx.need_tokenizer()
    bad = [t for t in request.tokens if not 0 <= t < len(tok)]
    if bad:
        raise OpenAIError(f"tokens must be ids in [0, {len(tok)}), got {bad[:5]}.", param="tokens")
    return DetokenizeResponse(prompt=tok.decode(request.tokens))
