"""Chat templates: load a user-supplied one, and render OpenAI-style messages into a prompt.

Rendering goes through the tokenizer's own ``apply_chat_template`` (transformers' sandboxed
Jinja environment with its helpers), so a prompt is exactly what the model's authors wrote
the template for; this module only checks and normalizes the messages first, and turns
every failure into a ``ValueError`` the HTTP layer can answer with a 400.

Jinja's sandbox stops code from escaping, not from looping: a template sent with a request can
spin for minutes, holding the GIL. ``time_budget_s`` bounds that: the compiled template's own
lines are traced (its code is Python bytecode), so past the budget the rendering fails with a
``ValueError``, and every couple of milliseconds it sleeps a moment so that the server's event
loop and engine thread get the GIL at once, not when the interpreter's switch interval and the
OS scheduler happen to favour them.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["ALLOWED_ROLES", "REQUEST_TEMPLATE_BUDGET_S", "RESERVED_TEMPLATE_KWARGS", "TEXT_PART_TYPES",
           "TemplateBudgetExceeded", "apply_chat_template", "load_chat_template", "time_budget"]

ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
TEXT_PART_TYPES = frozenset({"text", "input_text"})
# Arguments of transformers' apply_chat_template that are not template variables: passing them
# through chat_template_kwargs would change what this function returns or renders.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens",
})
_URL_TIMEOUT_S = 30
# How long a template sent with a request may render (vLLM's --trust-request-chat-template) before it is
# stopped: templates render in milliseconds, a runaway one would hold a worker for minutes.
REQUEST_TEMPLATE_BUDGET_S = 2.0


def load_chat_template(arg: str | None) -> str | None:
    """The template text named by ``arg``: a file path, an http(s) URL, or inline Jinja text.

    Text that contains no Jinja markup and names no existing file is taken for a mistyped path
    and rejected, rather than silently used as a template that ignores the messages.
    """
    if arg is None:
        return None
    if arg.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(arg, timeout=_URL_TIMEOUT_S) as response:
                return response.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"Could not download the chat template from {arg}: {e}") from e
    path = os.path.expanduser(arg)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"Could not read the chat template file {arg}: {e}") from e
    if any(mark in arg for mark in ("{{", "{%", "{#", "\n")):
        return arg
    raise ValueError(f"The chat template {arg!r} is neither an existing file, an http(s) URL, nor Jinja "
                     "text (no '{{', '{%' or newline in it).")


class TemplateBudgetExceeded(Exception):
    """Raised inside a rendering whose time budget ran out."""


_TEMPLATE_FILENAME = "<template>"  # what Jinja compiles template source under
_CHECK_EVERY_LINES = 512
_RUN_S, _YIELD_S = 0.002, 0.001  # at most 2 ms with the GIL, then 1 ms without


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Within the block, compiled Jinja templates run at most ``seconds`` (``TemplateBudgetExceeded``
    after that) and give up the GIL for ``_YIELD_S`` after every ``_RUN_S`` they run.

    Only this thread's template frames are traced, so the rest of the rendering runs at full speed.
    """
    if seconds is None:
        yield
        return
    start = time.monotonic()
    deadline = start + seconds
    state = {"lines": 0, "ran_since": start}

    def in_template(frame: Any, event: str, arg: Any) -> Any:
        state["lines"] += 1
        if state["lines"] % _CHECK_EVERY_LINES == 0:
            now = time.monotonic()
            if now > deadline:
                raise TemplateBudgetExceeded
            if now - state["ran_since"] > _RUN_S:
                time.sleep(_YIELD_S)
                state["ran_since"] = time.monotonic()
        return in_template

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return in_template if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _content_text(content: Any, index: int) -> str:
    """A message's content as one string: OpenAI content parts have their text parts joined."""
    if content is None:
        return ""  # an assistant turn with only tool calls
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("type"), str) and part["type"] in TEXT_PART_TYPES:
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"messages[{index}]: a text content part needs a string 'text'.")
                texts.append(text)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"messages[{index}]: content part of type {kind!r} is not supported; "
                                 "this model takes text only.")
        return "\n".join(texts)
    raise ValueError(f"messages[{index}]: content must be a string or a list of content parts, "
                     f"got {type(content).__name__}.")


def _arguments_as_object(call: Any) -> Any:
    """An assistant's ``tool_calls[].function.arguments`` as templates expect it (they write it with
    ``tojson``): vLLM's rule, missing or empty arguments are ``{}`` and JSON text (what OpenAI clients send)
    is parsed; text that is not JSON stays as it is."""
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    arguments = call["function"].get("arguments")
    if not arguments:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return call
    return {**call, "function": {**call["function"], "arguments": arguments}}


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise ValueError("messages must contain at least one message.")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'.")
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; allowed roles: "
                             f"{', '.join(sorted(ALLOWED_ROLES))}.")
        normalized = {**message, "content": _content_text(message.get("content"), i)}
        if isinstance(message.get("tool_calls"), (list, tuple)):
            normalized["tool_calls"] = [_arguments_as_object(call) for call in message["tool_calls"]]
        out.append(normalized)
    return out


def apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False,
                        chat_template_kwargs: Mapping[str, Any] | None = None,
                        tools: list[dict[str, Any]] | None = None, time_budget_s: float | None = None) -> str:
    """Render ``messages`` into a prompt string with ``chat_template`` or the tokenizer's template.

    ``time_budget_s`` (for templates from untrusted sources) stops a rendering that runs longer.
    """
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("The tokenizer has no chat template and none was given; pass one with "
                         "--chat-template (a file, a URL, or Jinja text).")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true: either "
                         "start a new assistant turn or continue the last message.")
    conversation = _normalize_messages(messages)
    extra = dict(chat_template_kwargs or {})
    clash = sorted(RESERVED_TEMPLATE_KWARGS.intersection(extra))
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(clash)}.")

    from jinja2.exceptions import TemplateError
    try:
        with time_budget(time_budget_s):
            rendered = tokenizer.apply_chat_template(
                conversation, chat_template=template, tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                **extra)
    except TemplateBudgetExceeded:
        raise ValueError(f"The chat template did not finish rendering within its budget of {time_budget_s:g} s "
                         "and was stopped.") from None
    except RecursionError as e:
        raise ValueError(f"The chat template failed to render: {e}.") from None
    except TemplateError as e:
        raise ValueError(f"The chat template failed to render: {e}") from e
    except (TypeError, KeyError, IndexError) as e:  # a template indexing what these messages lack
        raise ValueError(f"The chat template failed to render these messages ({type(e).__name__}: {e}).") from e
    if not isinstance(rendered, str):
        raise ValueError(f"The chat template rendered {type(rendered).__name__}, expected a string.")
    return rendered
