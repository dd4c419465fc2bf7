"""Aphrodite's sampler fields and structured output over HTTP, through the official ``openai`` client."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
          "required": ["city"], "additionalProperties": False}


def test_every_sampler_field_is_accepted(client):
    extra = dict(min_p=0.05, top_a=0.1, tfs=0.95, eta_cutoff=1e-4, epsilon_cutoff=1e-4, typical_p=0.95,
                 smoothing_factor=0.2, smoothing_curve=1.5, xtc_threshold=0.2, xtc_probability=0.5, nsigma=2.0,
                 skew=0.1, dynatemp_min=0.5, dynatemp_max=1.2, dynatemp_exponent=1.0, temperature_last=True,
                 no_repeat_ngram_size=3, repetition_penalty=1.1, dry_multiplier=0.8, dry_base=1.75,
                 dry_allowed_length=2, dry_sequence_breakers=["\n", ":"], dry_range=64, bad_words=["dragon"],
                 seed=3)
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0.9,
                                    extra_body=extra)
    assert out.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          extra_body={"mirostat_mode": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.1,
                                                      "sampler_priority": [s for s in range(14)]})
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize("body,param", [({"top_a": -1}, "top_a"), ({"mirostat_mode": 1}, "mirostat_mode"),
                                        ({"sampler_priority": ["min_p"]}, None), ({"dry_base": 0.5}, "dry_base")])
def test_sampler_limits_are_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=body)
    assert e.value.status_code == 400
    if param:
        assert e.value.body["param"] == param


def test_response_format_json_schema_and_json_object(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a city as JSON."}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    comp = client.completions.create(model=MODEL, prompt="A JSON object:", max_tokens=40, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"},
                                                 "structured_outputs": None})
    assert isinstance(json.loads(comp.choices[0].text), dict)


def test_structured_outputs_and_guided_fields(client):
    out = client.completions.create(model=MODEL, prompt="Sentiment of 'great movie':", max_tokens=5,
                                    extra_body={"structured_outputs": {"choice": ["positive", "negative"]}})
    assert out.choices[0].text in ("positive", "negative")
    out = client.completions.create(model=MODEL, prompt="Zip code:", max_tokens=10,
                                    extra_body={"guided_regex": r"\d{5}"})
    assert re.fullmatch(r"\d{5}", out.choices[0].text)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}],
                                         max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].message.content in ("yes", "no")
    out = client.completions.create(model=MODEL, prompt="City:", max_tokens=40,
                                    extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    out = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=8,
                                    extra_body={"guided_grammar": 'root ::= "ok" | "fine"'})
    assert out.choices[0].text in ("ok", "fine")
    stream = client.completions.create(model=MODEL, prompt="Zip code:", max_tokens=10, stream=True,
                                       extra_body={"guided_regex": r"\d{5}"})
    assert re.fullmatch(r"\d{5}", "".join(c.choices[0].text for c in stream if c.choices))


def test_bad_schema_or_grammar_is_400_with_the_library_message(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"guided_grammar": "root ::= missing_rule"})
    assert "missing_rule" in e.value.body["message"] and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    with pytest.raises(openai.BadRequestError, match="Only one structured output"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    # The server keeps serving.
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
