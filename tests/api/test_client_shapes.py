"""Request bodies copied byte for byte from client libraries, replayed through a real uvicorn server.

The OpenAI Agents SDK 0.25's default model (``OpenAIResponsesModel``) with one ``function_tool`` and
``ModelSettings(tool_choice="required")`` sends the two ``/v1/responses`` bodies below (captured
with an ``httpx`` request hook): ``include: []``, a strict tool whose schema carries ``title`` and
``additionalProperties: false``, and on the second turn the model's ``function_call`` item echoed
back with its ``id`` and ``status`` plus a ``function_call_output``. The one change: ``maxLength`` on
``city``, so the test model (random weights) finishes the call within ``max_output_tokens``. The SDK reads
``output[*].type == "function_call"`` items and then a ``message`` item's ``output_text``.
"""

from __future__ import annotations

import json

import httpx

from tests.api.conftest import MODEL

TOOL = {"name": "get_weather", "type": "function", "strict": True, "description": "Get the weather for a city.",
        "parameters": {"properties": {"city": {"title": "City", "type": "string", "maxLength": 8}}, "required": ["city"],
                       "title": "get_weather_args", "type": "object", "additionalProperties": False}}


def _agents_sdk_body(input_items: list[dict], **extra: object) -> dict:
    """The Agents SDK's ``responses.create`` body (key order as it sends them)."""
    return {"include": [], "input": input_items, "instructions": "Use tools.", "max_output_tokens": 40,
            "model": MODEL, "temperature": 0.0, "tools": [TOOL], **extra}


def test_agents_sdk_tool_turn_and_its_follow_up(server) -> None:
    user = {"content": "Weather in Paris?", "role": "user"}
    first = httpx.post(f"{server.base_url}/v1/responses", timeout=120,
                       json=_agents_sdk_body([user], tool_choice="required"))
    assert first.status_code == 200, first.text
    assert "x-kubeinfer-ignored-fields" not in first.headers
    calls = [item for item in first.json()["output"] if item["type"] == "function_call"]
    assert calls and calls[0]["name"] == "get_weather" and calls[0]["status"] == "completed"
    args = json.loads(calls[0]["arguments"])
    assert set(args) == {"city"} and isinstance(args["city"], str)
    call = {key: calls[0][key] for key in ("arguments", "call_id", "name", "type", "id", "status")}
    output = {"call_id": call["call_id"], "output": "Sunny in Paris", "type": "function_call_output"}
    second = httpx.post(f"{server.base_url}/v1/responses", timeout=120,
                        json=_agents_sdk_body([user, call, output]))
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["status"] in ("completed", "incomplete")
    messages = [item for item in body["output"] if item["type"] == "message"]
    assert messages and messages[0]["content"][0]["type"] == "output_text"
    assert body["usage"]["input_tokens"] > first.json()["usage"]["input_tokens"]


def test_include_that_asks_for_something_is_reported_ignored(server) -> None:
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, "include": ["message.output_text.logprobs"]}
    r = httpx.post(f"{server.base_url}/v1/responses", timeout=60, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-kubeinfer-ignored-fields"] == "include"
