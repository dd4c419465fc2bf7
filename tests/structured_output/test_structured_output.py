"""Structured output on the default model: every constrained output parses and validates."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from aphrodite import LLM, SamplingParams
from aphrodite.sampling_params import StructuredOutputsParams as SO

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ITEMS = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                    "minItems": 1, "maxItems": 2},
                                          "done": {"type": "boolean"}},
         "required": ["items", "done"], "additionalProperties": False}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]
GRAMMAR = 'root ::= "The answer is " ("yes" | "no") "."'


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512, device="cpu")


def check(kind, value, text):
    if kind == "json":
        jsonschema.validate(json.loads(text), value)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(value, text), text
    elif kind == "choice":
        assert text in value
    elif kind == "grammar":
        assert re.fullmatch(r"The answer is (yes|no)\.", text), text


def test_batch_of_16_mixed_constraints(llm):
    kinds = [("json", PERSON), ("json", ITEMS), ("json_object", True), ("regex", PHONE), ("choice", CHOICES),
             ("grammar", GRAMMAR), ("free", None), ("json", PERSON)] * 2
    params = []
    for i, (kind, value) in enumerate(kinds):
        # Compact JSON keeps the outputs short (any whitespace is allowed by default).
        extra = {"disable_any_whitespace": True} if kind.startswith("json") else {}
        so = None if kind == "free" else SO(**{kind: value}, **extra)
        params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=40, structured_outputs=so,
                                     min_p=0.05 if i % 2 else 0.0, repetition_penalty=1.05 if i % 3 else 1.0))
    prompts = ["Describe a person as JSON.", "List groceries as JSON.", "Say something in JSON.",
               "My phone number is", "The review was great. Sentiment:", "Is water wet?", "Once upon a time",
               "A JSON person:"] * 2
    outs = llm.generate(prompts, params, use_tqdm=False)
    for (kind, value), out in zip(kinds, outs):
        o = out.outputs[0]
        if kind != "free":
            assert o.finish_reason == "stop", (kind, o.text)
            check(kind, value, o.text)


def test_async_scheduling_waits_for_the_token_in_flight(llm):
    """With async scheduling a constrained row's mask needs the token still in flight: those steps wait."""
    engine = llm.llm_engine
    engine._depth = 2       # async scheduling on the same engine: queue step N+1 before reading step N
    try:
        kinds = [("regex", PHONE), ("choice", CHOICES), ("grammar", GRAMMAR), ("free", None)]
        params = [SamplingParams(temperature=0.9, seed=i, max_tokens=16,
                                 structured_outputs=None if kind == "free" else SO(**{kind: value}))
                  for i, (kind, value) in enumerate(kinds)]
        outs = llm.generate(["My number is", "Sentiment:", "Is water wet?", "Hello"], params, use_tqdm=False)
    finally:
        engine._depth = 1
    for (kind, value), out in zip(kinds, outs):
        if kind != "free":
            check(kind, value, out.outputs[0].text)


def test_bad_grammar_is_a_value_error_and_nothing_else_is_affected(llm):
    engine = llm.llm_engine
    engine.add_request("good", "The capital of France is", SamplingParams(temperature=0, max_tokens=8,
                                                                         structured_outputs=SO(choice=["Paris"])))
    with pytest.raises(ValueError, match="Invalid structured output grammar"):
        llm.generate(["x"], SamplingParams(structured_outputs=SO(grammar="root ::= undefined_rule")), use_tqdm=False)
    with pytest.raises(ValueError, match="Invalid structured output json"):
        llm.generate(["x"], SamplingParams(structured_outputs=SO(json={"type": "no-such-type"})), use_tqdm=False)
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [o.outputs[0].text for o in done] == ["Paris"]


def test_one_compilation_per_key(llm):
    manager = llm.llm_engine.structured_output
    a = manager.submit(SO(json=dict(PERSON)))
    b = manager.submit(SO(json=json.dumps(PERSON)))
    assert a is b and a.result() is not None
    with pytest.raises(ValueError, match="only use one kind"):
        SO(json=PERSON, regex="a")
