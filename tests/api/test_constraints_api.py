"""Penalties, constraints and structured outputs through the official client and real uvicorn.

Structured outputs run on the random-weight tiny model: whatever it would write, the output
must parse and validate (JSON schema), fully match (regex) or be one of the choices.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.api.conftest import MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}


def _ids(server, text: str) -> list[int]:
    return httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "prompt": text,
                                                           "add_special_tokens": False}, timeout=30).json()["tokens"]


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    free = [int(t.split(":")[1]) for t in client.completions.create(**kw).choices[0].logprobs.tokens]
    out = client.completions.create(logit_bias={str(free[0]): -100}, **kw)
    got = [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]
    assert free[0] not in got
    forced = client.completions.create(logit_bias={"1234": 100}, **kw)
    assert [t for t in forced.choices[0].logprobs.tokens] == ["token_id:1234"] * 6


def test_min_tokens_holds_back_eos_and_penalties_are_accepted(client: openai.OpenAI) -> None:
    eos = 1  # <|end_of_text|> of the tiny model, an EOS of its generation config
    base = dict(model=MODEL, prompt="Hi", max_tokens=20, temperature=0, logit_bias={str(eos): 100})
    early = client.completions.create(**base)
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"
    held = client.completions.create(extra_body={"min_tokens": 5}, **base)
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"
    # What litellm and LangChain send: penalties, through the client's own parameters.
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         frequency_penalty=1.5, presence_penalty=0.5, seed=3,
                                         extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "top_k": 50})
    assert out.usage.completion_tokens >= 1


def test_allowed_token_ids_bad_words_and_stop_string_options(client: openai.OpenAI, server) -> None:
    allowed = [300, 301, 302]
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=1.5, seed=1, logprobs=0,
                                    extra_body={"allowed_token_ids": allowed, "ignore_eos": True,
                                                "return_tokens_as_token_ids": True})
    assert {int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens} <= set(allowed)
    free = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    word = free.split()[0]
    banned = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True, "bad_words": [word]}).choices[0].text
    assert word not in banned.split()
    # include_stop_str_in_output keeps the stop string; by default it is cut.
    stop = free[3:6]
    cut = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0].text
    kept = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop and not cut.endswith(stop)
    # skip_special_tokens false shows a forced special token in the text.
    pad = 2  # <|pad|>
    shown = client.completions.create(model=MODEL, prompt="The", max_tokens=2, temperature=0,
                                      logit_bias={str(pad): 100},
                                      extra_body={"ignore_eos": True, "skip_special_tokens": False})
    hidden = client.completions.create(model=MODEL, prompt="The", max_tokens=2, temperature=0,
                                       logit_bias={str(pad): 100}, extra_body={"ignore_eos": True})
    assert shown.choices[0].text == "<|pad|><|pad|>" and hidden.choices[0].text == ""


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_schema_outputs_always_validate(client: openai.OpenAI, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Make a person."}],
                                         response_format=fmt, max_tokens=200, temperature=1.0, seed=seed, n=2)
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_guided_fields_regex_choice_grammar_and_json_object(client: openai.OpenAI) -> None:
    pattern = r"[A-Z][a-z]{2,6}-\d{3}"
    for seed in range(3):
        text = client.completions.create(model=MODEL, prompt="Code:", max_tokens=30, temperature=1.0, seed=seed,
                                         extra_body={"guided_regex": pattern}).choices[0].text
        assert re.fullmatch(pattern, text), text
    choices = ["red alert", "green", "blue moon"]
    for seed in range(3):
        text = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "colour?"}],
                                              max_tokens=10, temperature=1.5, seed=seed,
                                              extra_body={"guided_choice": choices}).choices[0].message.content
        assert text in choices
    new_form = client.completions.create(model=MODEL, prompt="pick", max_tokens=10, temperature=1.0,
                                         extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert new_form.choices[0].text in ("yes", "no")
    grammar = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'
    text = client.completions.create(model=MODEL, prompt="sum", max_tokens=40, temperature=0.8, seed=5,
                                     extra_body={"guided_grammar": grammar}).choices[0]
    assert text.finish_reason == "stop" and re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", text.text), text.text
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = client.completions.create(model=MODEL, prompt="json", max_tokens=30, temperature=0.7,
                                    extra_body={"guided_json": schema})
    assert json.loads(out.choices[0].text) in ({"ok": True}, {"ok": False})
    obj = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "json please"}],
                                         response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a valid prefix of an object
        assert obj.choices[0].message.content.startswith("{")


def test_structured_stream_gives_the_same_valid_json(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "person"}], response_format=fmt, max_tokens=200,
              temperature=0.9, seed=11)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
             if c.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), PERSON)


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
])
def test_bad_structured_requests_are_400_naming_the_field(client: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body
