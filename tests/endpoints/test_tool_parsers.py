"""Tool-call and reasoning parsers on fixed model outputs, whole and streamed (one character at a time
and in token-sized pieces), against hand-written expected calls; the streamed argument pieces must add
up to the whole answer's arguments, which must be ``json.dumps`` of the written arguments."""
from __future__ import annotations

import json
import random

import pytest

from aphrodite.endpoints.openai.reasoning import get_reasoning_parser
from aphrodite.endpoints.openai.tool_parsers import TOOL_PARSERS, ToolCallStream, get_tool_parser
from aphrodite.endpoints.openai.tool_parsers.json_scan import scan_value
from aphrodite.endpoints.openai.tools import RequiredToolParser

WEATHER = {"city": "París", "days": 3, "units": None, "hourly": True, "at": [6.5, {"h": "12:00"}]}
WEATHER_RAW = '{"city":"Par\\u00eds","days":3, "units":null,"hourly":true ,"at":[6.50,{"h":"12:00"}]}'

# (parser, model output, expected content, expected [(name, arguments object)])
CASES = [
    ("hermes", 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": ' + WEATHER_RAW + '}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "I will check.\n", [("get_weather", WEATHER), ("get_time", {})]),
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}', None,
     [("get_time", {"zone": "CET"})]),
    ("hermes", "No tools: 2 < 3 and <tool is not a call.", "No tools: 2 < 3 and <tool is not a call.", []),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": ' + WEATHER_RAW + '}; '
     '{"name": "get_time", "arguments": {"zone": "a;b"}}', None,
     [("get_weather", WEATHER), ("get_time", {"zone": "a;b"})]),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone": "UTC"}}', None, [("get_time", {"zone": "UTC"})]),
    ("llama3_json", "The answer is {not json}.", "The answer is {not json}.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": ' + WEATHER_RAW + '}, '
     '{"name": "get_time", "arguments": {"zone": "UTC"}}]', "Sure. ",
     [("get_weather", WEATHER), ("get_time", {"zone": "UTC"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]' + WEATHER_RAW + '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}', None,
     [("get_weather", WEATHER), ("get_time", {"zone": "UTC"})]),
    ("mistral", "Plain [TOOL answer.", "Plain [TOOL answer.", []),
    ("pythonic", '[get_weather(city="París", days=3, units=None, hourly=True, at=[6.5, {"h": \'12:00\'}]), get_time()]',
     None, [("get_weather", WEATHER), ("get_time", {})]),
    ("pythonic", "[get_time(zone='a, b)')]", None, [("get_time", {"zone": "a, b)"})]),
    ("pythonic", "[1, 2, 3] are numbers.", "[1, 2, 3] are numbers.", []),
    ("pythonic", "Hello [world]", "Hello [world]", []),
]


def _expected(calls: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    return [(name, json.dumps(args, ensure_ascii=False)) for name, args in calls]


def _stream(parser_name: str, text: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Feed the growing text piece by piece; reassemble content and calls as an OpenAI client does."""
    stream = ToolCallStream(get_tool_parser(parser_name))
    content, calls, ids = "", {}, []
    so_far = ""
    for k, piece in enumerate(pieces):
        so_far += piece
        new_content, deltas = stream.step(so_far, k == len(pieces) - 1)
        content += new_content
        for d in deltas:
            entry = calls.setdefault(d["index"], ["", ""])
            if "id" in d:
                assert d["type"] == "function" and d["function"]["name"] and d["index"] == len(ids)
                ids.append(d["id"])
            entry[0] += d["function"].get("name", "")
            entry[1] += d["function"].get("arguments", "")
    assert so_far == text
    return content, [tuple(calls[i]) for i in sorted(calls)], ids


def _token_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        pieces.append(text[i:i + k])
        i += k
    return pieces


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_parser_whole_and_streamed(name: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = get_tool_parser(name).extract_tool_calls(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == _expected(calls)
    assert all(c["type"] == "function" and c["id"] for c in got_calls)
    for pieces in (list(text), _token_pieces(text, 0), _token_pieces(text, 1), [text]):
        streamed_content, streamed_calls, ids = _stream(name, text, pieces)
        assert streamed_calls == _expected(calls)
        assert len(set(ids)) == len(ids)
        assert streamed_content == (content or "")


def test_malformed_call_is_content_whole_and_stops_streaming() -> None:
    """vLLM's rule: a call that does not parse leaves the whole text as content; a stream cannot take back
    what it sent, but sends nothing past the point where the JSON went wrong."""
    text = '<tool_call>\n{"name": "get_time", "arguments": {"zone": }\n</tool_call>'
    assert get_tool_parser("hermes").extract_tool_calls(text) == (text, [])
    assert _stream("hermes", text, list(text))[:2] == ("", [("get_time", '{"zone": ')])
    assert _stream("hermes", text, [text])[:2] == (text, [])  # nothing sent yet: as whole


def test_streamed_content_never_shows_a_call_marker() -> None:
    text = 'Let me see <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    stream = ToolCallStream(get_tool_parser("hermes"))
    shown = ""
    for k in range(1, len(text) + 1):
        shown += stream.step(text[:k], k == len(text))[0]
        assert "<" not in shown
    assert shown == "Let me see "


def test_parallel_tool_calls_false_streams_only_the_first_call() -> None:
    text = ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    stream = ToolCallStream(get_tool_parser("hermes"), max_calls=1)
    deltas = [d for k in range(1, len(text) + 1) for d in stream.step(text[:k], k == len(text))[1]]
    assert {d["index"] for d in deltas} == {0}


def test_mistral_ids_are_nine_alphanumerics() -> None:
    _, calls = get_tool_parser("mistral").extract_tool_calls('[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    assert len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()


def test_registry_has_vllm_names() -> None:
    assert {"hermes", "llama3_json", "llama4_json", "mistral", "pythonic"} <= set(TOOL_PARSERS)
    with pytest.raises(ValueError, match="Unknown tool call parser"):
        get_tool_parser("nope")


def test_required_choice_list() -> None:
    text = '[{"name": "get_weather", "parameters": ' + WEATHER_RAW + '}, {"name": "get_time", "parameters": {}}]'
    parser = RequiredToolParser()
    content, calls = parser.extract_tool_calls(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        _expected([("get_weather", WEATHER), ("get_time", {})])
    stream = ToolCallStream(parser)
    args = {}
    for k in range(1, len(text) + 1):
        for d in stream.step(text[:k], k == len(text))[1]:
            args[d["index"]] = args.get(d["index"], "") + d["function"]["arguments"]
    assert [args[0], args[1]] == [c["function"]["arguments"] for c in calls]


@pytest.mark.parametrize("seed", range(4))
def test_json_scan_prefixes_are_prefixes_of_json_dumps(seed: int) -> None:
    """Random values written in several styles: every partial scan is a prefix of ``json.dumps``, the
    full scan equals it (the reference is the standard library)."""
    rng = random.Random(seed)

    def value(depth: int = 0):
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return rng.choice([0, -7, 12345678901234567890, 3.25, -0.5e-3, 1e21])
        if kind == 1:
            chars = ['a', ' ', '"', '\\', '\n', 'é', '😀', '/', '\t', 'z']
            return "".join(rng.choice(chars) for _ in range(rng.randrange(6)))
        if kind == 2:
            return rng.choice([True, False, None])
        if kind == 3:
            return "x"
        if kind in (4, 5):
            return {f"k{i}\"": value(depth + 1) for i in range(rng.randrange(4))}
        return [value(depth + 1) for _ in range(rng.randrange(4))]

    for _ in range(30):
        v = {"v": value()}
        want = json.dumps(v, ensure_ascii=False)
        for raw in (json.dumps(v), json.dumps(v, indent=2), json.dumps(v, separators=(",", ":"), ensure_ascii=False)):
            for k in range(len(raw) + 1):
                scanned = scan_value(raw, 0)
                part = scan_value(raw[:k], 0)
                assert part.valid and want.startswith(part.canonical), (raw[:k], part.canonical)
            assert scanned.canonical == want and scanned.end == len(raw)


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("<think>Paris is in France.</think>The capital is Paris.", "Paris is in France.", "The capital is Paris."),
    ("Paris is in France.</think>\n\nParis.", "Paris is in France.", "\n\nParis."),   # <think> was in the prompt
    ("<think>Still thinking when max_tokens hit", "Still thinking when max_tokens hit", None),
    ("<think>Done.</think>", "Done.", None),
])
def test_reasoning_parsers(name: str, text: str, reasoning: str, content: str | None) -> None:
    assert get_reasoning_parser(name).extract(text) == (reasoning, content)
    for pieces in (list(text), _token_pieces(text, 2)):
        parser = get_reasoning_parser(name)
        got_r = got_c = ""
        sent_r = 0
        so_far = ""
        for k, piece in enumerate(pieces):
            so_far += piece
            r, c = parser.parse(so_far, k == len(pieces) - 1)
            assert r.startswith(got_r) and c.startswith(got_c)
            got_r, got_c = r, c
            assert "<" not in r[sent_r:] or "<" in reasoning
            sent_r = len(r)
        assert (got_r, got_c) == (reasoning, content or "")


def test_qwen3_with_thinking_off_is_all_content() -> None:
    parser = get_reasoning_parser("qwen3", chat_template_kwargs={"enable_thinking": False})
    assert parser.extract("Just the answer.") == (None, "Just the answer.")
    assert get_reasoning_parser("deepseek_r1", chat_template_kwargs={"enable_thinking": False}).extract(
        "x</think>y") == ("x", "y")


def test_reasoning_grammar_prefix_is_thinking_up_to_the_first_end_token() -> None:
    """The EBNF a constrained answer follows when the model thinks first, run by xgrammar over a
    one-character vocabulary, against the plain rule: text without ``</think>``, then ``</think>``, then
    blanks. Random strings over the end token's own characters hit every partial match."""
    import xgrammar as xgr
    parser = get_reasoning_parser("deepseek_r1")
    vocab = list("</think>a \n") + ["<eos>"]
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1])
    compiled = xgr.GrammarCompiler(info).compile_grammar(parser.grammar_prefix())
    end = parser.end_token

    def accepted(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(vocab.index(ch)) for ch in text) and matcher.accept_token(len(vocab) - 1)

    rng = random.Random(0)
    texts = ["</think>", "<think>\nhi a</think>\n\n", "a</thi</think>", "<<</think>", "</think></think>", "a</think>a",
             "hi a"]
    texts += ["".join(rng.choice(vocab[:-1]) for _ in range(rng.randint(0, 14))) + end + " " * rng.randint(0, 2)
              for _ in range(300)]
    for text in texts:
        body = text.rstrip(" \n")
        expected = body.endswith(end) and body.find(end) == len(body) - len(end)
        assert accepted(text) == expected, text
    assert parser.ended_in("<think>\n\n</think>\n\n") and not parser.ended_in("<|im_start|>assistant\n<think>\n")
    assert get_reasoning_parser("qwen3", chat_template_kwargs={"enable_thinking": False}).ended_in("")
