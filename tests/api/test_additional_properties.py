"""JSON schemas admit only the properties they declare unless they say otherwise (vLLM's default backend).

LangChain's ``bind_tools(tool_choice=<name>)`` / ``with_structured_output(method="function_calling")``
and litellm's ``hosted_vllm/`` send tool schemas without ``additionalProperties``; llguidance on
its own would let the model add any key there. The opt-out is vLLM's option name,
``disable_additional_properties: false`` (per request in ``structured_outputs``).
"""

from __future__ import annotations

import json

import openai
import pytest
from kubeinfer_serving.api.structured import forbid_additional_properties

from tests.api.conftest import MODEL

#: A tool as LangChain's ``convert_to_openai_tool`` writes it for a pydantic model: no
#: ``additionalProperties``, nothing required, so only the grammar keeps other keys out.
LANGCHAIN_TOOL = {"type": "function", "function": {
    "name": "Person", "description": "A person.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                     "age": {"type": "integer"}}, "required": []}}}
DECLARED = {"name", "age"}
SEEDS = range(12)


def _forced_call_keys(client: openai.OpenAI, seed: int, **extra) -> set[str] | None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "who?"}], tools=[LANGCHAIN_TOOL], max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "Person"}}, temperature=1.0, seed=seed, **extra)
    calls = out.choices[0].message.tool_calls
    if not calls:  # cut by max_tokens before the JSON closed
        return None
    assert calls[0].function.name == "Person"
    return set(json.loads(calls[0].function.arguments))


def test_forced_tool_call_without_additional_properties_has_only_declared_keys(client: openai.OpenAI) -> None:
    found = [keys for seed in SEEDS if (keys := _forced_call_keys(client, seed)) is not None]
    assert found, "no call finished within max_tokens"
    assert all(keys <= DECLARED for keys in found), found


def test_the_opt_out_lets_undeclared_keys_through(client: openai.OpenAI) -> None:
    """With vLLM's option set to false the same random model writes keys the schema does not declare
    (which shows the test above can fail)."""
    opt_out = {"extra_body": {"structured_outputs": {"disable_additional_properties": False}}}
    found = [keys for seed in SEEDS if (keys := _forced_call_keys(client, seed, **opt_out)) is not None]
    assert any(keys - DECLARED for keys in found), found


def test_response_format_json_schema_is_closed_too(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}
    for seed in SEEDS:
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "json"}], max_tokens=48, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        choice = out.choices[0]
        if choice.finish_reason == "stop":
            assert set(json.loads(choice.message.content)) <= {"a", "b"}, choice.message.content


def test_bad_opt_out_value_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       extra_body={"structured_outputs": {"disable_additional_properties": "no"}})
    assert err.value.body["param"] == "structured_outputs.disable_additional_properties"


def test_schema_closing_rules() -> None:
    schema = {"type": "object", "properties": {
        "inner": {"type": "object", "properties": {"x": {"type": "string"}}},
        "free": {"type": "object"},
        "open": {"type": "object", "properties": {"y": {}}, "additionalProperties": True},
        "list": {"type": "array", "items": {"properties": {"z": {}}}},
        "either": {"anyOf": [{"properties": {"p": {}}}, {"type": "null"}]},
        "both": {"allOf": [{"properties": {"q": {}}}, {"properties": {"r": {}}}]},
    }, "$defs": {"D": {"properties": {"d": {}}}}}
    got = forbid_additional_properties(schema)
    props = got["properties"]
    assert got["additionalProperties"] is False
    assert props["inner"]["additionalProperties"] is False
    assert "additionalProperties" not in props["free"]
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["either"]["anyOf"][0]["additionalProperties"] is False
    assert all("additionalProperties" not in s for s in props["both"]["allOf"])
    assert got["$defs"]["D"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's schema is not modified
