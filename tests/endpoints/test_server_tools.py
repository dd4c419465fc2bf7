"""Tool calling and reasoning through the official ``openai`` client against real servers.

``tool_choice="required"`` and a named function constrain the model (xgrammar) to the call's JSON
schema: the calls must parse and validate against the tool's parameters (``jsonschema``), and the
stream must add up to the same calls. For ``"auto"`` and ``--reasoning-parser`` a server runs with
``--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser deepseek_r1`` and a ChatML
template whose prompt opens ``<think>``; the model's text is pinned with ``structured_outputs.choice``
(a real generation, only its tokens fixed) so the parsers meet known text.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from server_process import ServerProcess  # tests/ is on sys.path (rootdir conftest)

MODEL = "SmolLM2-135M-Instruct"

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
    "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris for two days?"}]

TEMPLATE = """{%- if tools %}<|im_start|>system
You may call: {% for t in tools %}{{ t.function.name }}{{ ", " if not loop.last }}{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>{% endfor %}{% elif m.role == "tool" %}<tool_response id={{ m.tool_call_id }}>\
{{ m.content }}</tool_response>{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""


@pytest.fixture(scope="module")
def tools_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    template = tmp_path_factory.mktemp("tools") / "chatml_think.jinja"
    template.write_text(TEMPLATE)
    server = ServerProcess(["--max-model-len", "1024", "--num-gpu-blocks-override", "64", "--enable-auto-tool-choice",
                            "--tool-call-parser", "hermes", "--reasoning-parser", "deepseek_r1",
                            "--chat-template", str(template)])
    try:
        server.wait_ready()
        yield openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)
    finally:
        server.stop()


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _reassemble_choices(stream) -> tuple[dict[int, dict], object]:
    """What a client builds from the chunks, per choice index: content, reasoning, calls by index (raw
    argument text), finish reason, logprob tokens; and the usage of the last chunk. Checks what vLLM's own
    tool tests check: at most one ``tool_calls`` entry per chunk, each call's id and name sent once, one
    finish reason per choice."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            out = choices.setdefault(choice.index, {"content": "", "reasoning": "", "raw_calls": {}, "finish": None,
                                                    "ids": {}, "tokens": []})
            delta = choice.delta
            out["content"] += delta.content or ""
            out["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
            assert len(delta.tool_calls or []) <= 1, f"one tool call entry per chunk: {delta.tool_calls}"
            for tc in delta.tool_calls or []:
                entry = out["raw_calls"].setdefault(tc.index, ["", ""])
                if tc.id:
                    assert tc.index not in out["ids"], "a call's id is sent once, with its name"
                    out["ids"][tc.index] = tc.id
                    assert tc.type == "function" and tc.function.name
                else:
                    assert not (tc.function and tc.function.name), "a call's name is sent once, with its id"
                entry[0] += (tc.function.name or "") if tc.function else ""
                entry[1] += (tc.function.arguments or "") if tc.function else ""
            out["tokens"] += [t.token for t in (choice.logprobs.content or [])] if choice.logprobs else []
            if choice.finish_reason is not None:
                assert out["finish"] is None, "one finish reason per choice"
                out["finish"] = choice.finish_reason
    for out in choices.values():
        out["raw_calls"] = [tuple(v) for _, v in sorted(out["raw_calls"].items())]
    return choices, usage


def _reassemble(stream) -> dict:
    """Choice 0 of ``_reassemble_choices``, its calls' arguments parsed."""
    out = _reassemble_choices(stream)[0][0]
    out["calls"] = [(name, json.loads(args)) for name, args in out["raw_calls"]]
    return out


def _check_valid(calls: list[tuple[str, dict]]) -> None:
    assert calls
    for name, args in calls:
        jsonschema.validate(args, SCHEMAS[name])


# ---- constrained: required and named (the default server, no flags needed) -------------------------------
@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_choice_gives_valid_calls(client: openai.OpenAI, parallel: bool) -> None:
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0,
                  parallel_tool_calls=parallel)
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = _calls(choice.message)
    _check_valid(calls)
    if not parallel:
        assert len(calls) == 1
    assert choice.message.content in ("", None)
    assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in choice.message.tool_calls)
    streamed = _reassemble(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["calls"] == calls and streamed["finish"] == "tool_calls" and streamed["content"] == ""


def test_named_tool_choice_gives_that_call(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's (and vLLM's) reason for a forced function
    calls = _calls(choice.message)
    assert [name for name, _ in calls] == ["get_time"]
    _check_valid(calls)
    streamed = _reassemble(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["calls"] == calls and streamed["finish"] == "stop"


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("extra", "message"), [
    ({"tools": TOOLS}, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    ({"tools": TOOLS, "tool_choice": "auto"}, '"auto" tool choice requires --enable-auto-tool-choice'),
    ({"tool_choice": "required"}, "When using `tool_choice`, `tools` must be set."),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "The tool specified in `tool_choice` does not match any of the specified `tools`"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, 'Invalid value for `tool_choice`: sometimes! Only named tools'),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "Invalid value for `function`: `None` in `tool_choice`!"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}},
     "Expected field `name` in `function` in `tool_choice`!"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": ""}}},
     "Invalid `name` in `function`: `` in `tool_choice`!"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
])
def test_tool_request_errors_are_400(client: openai.OpenAI, extra: dict, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
    assert message in e.value.message
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(("arguments", "seen"), [
    ('{"city": "Paris", "days": 2}', {"city": "Paris", "days": 2}),  # what OpenAI clients send
    ({"city": "Paris", "days": 2}, {"city": "Paris", "days": 2}),
    ("", {}),  # vLLM: empty arguments are {}
])
def test_template_renders_tools_tool_calls_and_tool_results(http, arguments, seen) -> None:
    """Through /tokenize (vLLM takes tools there too) and /detokenize: the template sees the tools, the
    assistant's call (content null) with its arguments as an object, and the tool result with its call id."""
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages, "tools": TOOLS, "chat_template": TEMPLATE})
    assert r.status_code == 200, r.text
    text = http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]}).json()["prompt"]
    assert "You may call: get_weather, get_time" in text
    call = json.dumps({"name": "get_weather", "arguments": seen})
    assert f"<tool_call>\n{call}\n</tool_call>" in text
    assert "<tool_response id=call_1>Sunny, 21 C</tool_response>" in text


def test_tools_reach_the_template_as_vllm_dumps_them(http) -> None:
    """vLLM hands templates ``tool.model_dump()``: unset fields as null, extra ones (``strict``) as sent.
    Templates that write ``tools | tojson`` (Qwen 2.5's, Hermes') then see the same text, token for token."""
    tools = [{"type": "function", "function": {"name": "ping", "strict": True}}, TOOLS[0]]
    expected = [{"type": "function", "function": {"name": "ping", "description": None, "parameters": None,
                                                  "strict": True}}, TOOLS[0]]
    r = http.post("/tokenize", json={"model": MODEL, "messages": ASK, "tools": tools,
                                     "chat_template": "{{ tools | tojson }}", "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    assert http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]}).json()["prompt"] == \
        json.dumps(expected)


def test_required_tool_choice_wins_over_response_format(client: openai.OpenAI) -> None:
    """vLLM replaces any other constraint with the tools' schema for a required (or named) choice."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "tool_calls"
    _check_valid(_calls(r.choices[0].message))


# ---- auto and reasoning (a server with the flags) ----------------------------------------------------------------
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n</tool_call>'


def _pinned(client: openai.OpenAI, text: str, stream: bool = False, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=kwargs.pop("max_tokens", 400), temperature=0, stream=stream,
        extra_body={"structured_outputs": {"choice": [text]}, **kwargs.pop("extra_body", {})}, **kwargs)


def test_auto_reads_calls_and_reasoning(tools_client: openai.OpenAI) -> None:
    text = "The user wants a forecast.</think>\n" + CALL
    r = _pinned(tools_client, text, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert _calls(choice.message) == [("get_weather", {"city": "Rome", "days": 3})]
    assert choice.message.content == "\n"  # the text before <tool_call>, as vLLM keeps it
    assert choice.message.model_extra["reasoning_content"] == "The user wants a forecast."
    streamed = _reassemble(_pinned(tools_client, text, stream=True, tools=TOOLS))
    assert streamed["calls"] == _calls(choice.message) and streamed["finish"] == "tool_calls"
    assert streamed["reasoning"] == "The user wants a forecast." and streamed["content"] == "\n"
    assert streamed["ids"][0].startswith("chatcmpl-tool-")


def test_auto_without_a_call_is_plain_content(tools_client: openai.OpenAI) -> None:
    text = "Easy.</think>It is sunny in <b>Paris</b>."
    r = _pinned(tools_client, text, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == "It is sunny in <b>Paris</b>."
    streamed = _reassemble(_pinned(tools_client, text, stream=True, tools=TOOLS))
    assert (streamed["content"], streamed["reasoning"]) == ("It is sunny in <b>Paris</b>.", "Easy.")
    assert streamed["calls"] == []


def test_auto_with_parallel_tool_calls_false_keeps_the_first(tools_client: openai.OpenAI) -> None:
    text = "Two.</think>" + CALL + '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert _calls(_pinned(tools_client, text, tools=TOOLS).choices[0].message) == [
        ("get_weather", {"city": "Rome", "days": 3}), ("get_time", {"zone": "UTC"})]
    r = _pinned(tools_client, text, tools=TOOLS, parallel_tool_calls=False)
    assert _calls(r.choices[0].message) == [("get_weather", {"city": "Rome", "days": 3})]
    streamed = _reassemble(_pinned(tools_client, text, stream=True, tools=TOOLS, parallel_tool_calls=False))
    assert streamed["calls"] == [("get_weather", {"city": "Rome", "days": 3})]


def test_reasoning_of_a_free_generation_is_the_models_text(tools_client: openai.OpenAI) -> None:
    """No constraint: the model writes inside the <think> its prompt opened and stops at max_tokens, so all
    of it is reasoning; the reference is /v1/completions on the same prompt tokens (no parser there)."""
    base = str(tools_client.base_url).rstrip("/").removesuffix("/v1")
    ids = httpx.post(f"{base}/tokenize", json={"model": MODEL, "messages": ASK}).json()["tokens"]
    reference = tools_client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text
    assert "</think>" not in reference
    r = tools_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == reference and message.content is None
    streamed = _reassemble(tools_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12,
                                                                temperature=0, stream=True))
    assert (streamed["reasoning"], streamed["content"]) == (reference, "")
    hidden = tools_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                                  extra_body={"include_reasoning": False})
    assert hidden.choices[0].message.model_extra.get("reasoning_content") is None


TWO_CALLS = "Two.</think>" + CALL + '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'


def test_calls_arriving_together_stream_one_per_chunk(tools_client: openai.OpenAI) -> None:
    """A stop string longer than the calls holds the text back until the end, so both calls' pieces reach
    the parser in one step; OpenAI (and vLLM's clients) still get one ``tool_calls`` entry per chunk."""
    whole = _pinned(tools_client, TWO_CALLS, tools=TOOLS)
    calls = _calls(whole.choices[0].message)
    assert calls == [("get_weather", {"city": "Rome", "days": 3}), ("get_time", {"zone": "UTC"})]
    streamed = _reassemble(_pinned(tools_client, TWO_CALLS, stream=True, tools=TOOLS, stop=["#" * 200]))
    assert streamed["calls"] == calls and streamed["finish"] == "tool_calls"
    assert len(set(streamed["ids"].values())) == 2


def test_max_tokens_cut_inside_a_call(tools_client: openai.OpenAI) -> None:
    """vLLM's answers to a call cut off by max_tokens: whole, the unparsable text stays content; streamed,
    the call's name and the arguments so far were sent. Both end with "length", not "tool_calls"."""
    text = "Ok.</think>" + CALL
    full = _pinned(tools_client, text, tools=TOOLS, logprobs=True)
    args = full.choices[0].message.tool_calls[0].function.arguments
    tokens = [t.token for t in full.choices[0].logprobs.content]
    cut = next(k for k in range(len(tokens)) if len("".join(tokens[:k])) >= text.index('"days"'))  # after "Rome"
    r = _pinned(tools_client, text, tools=TOOLS, max_tokens=cut)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert CALL.startswith(choice.message.content) and len(choice.message.content) > len('<tool_call>\n{"name": ')
    streamed = _reassemble_choices(_pinned(tools_client, text, stream=True, tools=TOOLS, max_tokens=cut))[0][0]
    assert streamed["finish"] == "length"
    [(name, partial)] = streamed["raw_calls"]
    assert name == "get_weather" and args.startswith(partial) and len(partial) < len(args)


def test_n_logprobs_and_usage_with_tools(tools_client: openai.OpenAI) -> None:
    """Two choices, each parsed on its own; the streamed logprobs cover every token (also those a parser
    holds back) and the final usage chunk counts what the whole answer counts."""
    text = "Ok.</think>" + CALL
    kwargs = dict(tools=TOOLS, n=2, logprobs=True, top_logprobs=1)
    whole = _pinned(tools_client, text, **kwargs)
    streamed, usage = _reassemble_choices(_pinned(tools_client, text, stream=True, **kwargs,
                                                  stream_options={"include_usage": True}))
    assert sorted(streamed) == [0, 1]
    for choice in whole.choices:
        got = streamed[choice.index]
        assert choice.finish_reason == got["finish"] == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == got["raw_calls"]
        assert [t.token for t in choice.logprobs.content] == got["tokens"]
        assert "".join(got["tokens"]) == text + "<|im_end|>"  # the EOS token has its logprob too
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def _thinking_turns(answer) -> list[dict]:
    """Two earlier turns that show the tiny model how to close its thinking before ``answer(zone)``."""
    turns = []
    for zone in ("UTC", "CET"):
        turns += [{"role": "user", "content": f"Time in {zone}?"},
                  {"role": "assistant", "content": f"<think>\nEasy.</think>{answer(zone)}"}]
    return [*turns, {"role": "user", "content": "Time in CET?"}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_constrained_call_comes_after_the_thinking(tools_client: openai.OpenAI, tool_choice) -> None:
    """With a reasoning parser, vLLM constrains the answer only once reasoning ended: the model thinks
    freely, then calls. The reasoning and the call must both come out, whole and streamed."""
    messages = _thinking_turns(lambda zone: json.dumps([{"name": "get_time", "parameters": {"zone": zone}}]))
    kwargs = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=60, temperature=0)
    r = tools_client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.message.model_extra["reasoning_content"] == "Easy."
    assert _calls(choice.message) == [("get_time", {"zone": "CET"})] and choice.message.content == ""
    assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
    streamed = _reassemble(tools_client.chat.completions.create(**kwargs, stream=True))
    assert (streamed["reasoning"], streamed["calls"], streamed["finish"]) == (
        "Easy.", _calls(choice.message), choice.finish_reason)


def test_response_format_json_comes_after_the_thinking(tools_client: openai.OpenAI) -> None:
    """The same for ``response_format``: the JSON is the content, not swallowed into reasoning_content."""
    r = tools_client.chat.completions.create(
        model=MODEL, messages=_thinking_turns(lambda zone: json.dumps({"zone": zone})), max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "time", "schema": TIME}})
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == "Easy." and json.loads(message.content) == {"zone": "CET"}
    assert r.choices[0].finish_reason == "stop"
