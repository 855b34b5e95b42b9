"""``/v1/responses`` through a real uvicorn server and the official client's ``client.responses`` API."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.api.conftest import MAX_MODEL_LEN, MODEL

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"]}}
FORCED = {"type": "function", "name": "get_weather"}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"]}


def test_text_input_matches_the_chat_route(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="hello there", instructions="Answer briefly.", max_output_tokens=8,
                                temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello there"}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer briefly." and r.max_output_tokens == 8 and r.temperature == 0


def test_message_items_and_max_output_tokens(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, max_output_tokens=5, extra_body={"ignore_eos": True}, input=[
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Say "}, {"type": "input_text", "text": "hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi", "annotations": []}]},
        {"role": "user", "content": "again"}])
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    assert r.output[0].type == "message" and r.output[0].status == "incomplete"


def _events(resp: httpx.Response) -> list[dict]:
    out, kind = [], None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            assert data["type"] == kind
            out.append(data)
    return out


def test_stream_sends_the_typed_events_in_order(client: openai.OpenAI, server) -> None:
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=6, stream=True,
                                          extra_body={"ignore_eos": True}))
    types = [e.type for e in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-5:] == ["response.output_text.delta", "response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text == events[-4].text
    assert final.usage.output_tokens == 6 and final.status == "incomplete"
    # Raw: each event names its type in the SSE ``event:`` line, and there is no ``[DONE]``.
    with httpx.stream("POST", f"{server.base_url}/v1/responses", timeout=60, json={
            "model": MODEL, "input": "hi", "max_output_tokens": 3, "stream": True}) as resp:
        assert resp.status_code == 200
        raw = _events(resp)
    assert raw[0]["type"] == "response.created" and raw[-1]["type"] in ("response.completed", "response.incomplete")


def test_json_schema_format_streamed_with_the_client_helper(client: openai.OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
    with client.responses.stream(model=MODEL, input="json please", text=fmt, max_output_tokens=64) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed"
    value = json.loads(final.output_text)
    assert set(value) == {"ok", "n"} and value["n"] in (1, 2, 3)
    assert "".join(deltas) == final.output_text
    full = client.responses.create(model=MODEL, input="json please", text=fmt, max_output_tokens=64)
    assert set(json.loads(full.output_text)) == {"ok", "n"}


def test_function_calls_and_their_outputs(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="weather in Paris?", tools=[WEATHER], tool_choice=FORCED,
                                max_output_tokens=40)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    args = json.loads(calls[0].arguments)
    assert set(args) == {"city"}  # the schema declares no other key (closed by default)
    # The call and its output go back as input items, as the Agents SDK sends them.
    follow = [{"role": "user", "content": "weather in Paris?"},
              {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
               "arguments": calls[0].arguments},
              {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}]
    r2 = client.responses.create(model=MODEL, input=follow, tools=[WEATHER], max_output_tokens=4)
    assert r2.usage.input_tokens > r.usage.input_tokens
    # Streamed: the call arrives as a function_call item with its arguments events.
    events = list(client.responses.create(model=MODEL, input="weather?", tools=[WEATHER], tool_choice=FORCED,
                                          max_output_tokens=40, stream=True))
    types = [e.type for e in events]
    assert "response.function_call_arguments.done" in types and types[-1] == "response.completed"
    added = next(e for e in events if e.type == "response.output_item.added")
    done = next(e for e in events if e.type == "response.output_item.done")
    assert added.item.type == done.item.type == "function_call" and added.item.status == "in_progress"
    assert set(json.loads(done.item.arguments)) == {"city"}
    assert events[-1].response.output[0].call_id == done.item.call_id
    # The arguments stream as the model writes them: several deltas that add up to the final string.
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1 and "".join(pieces) == done.item.arguments
    assert types.index("response.output_item.added") < types.index("response.function_call_arguments.delta")
    # The SDK's stream helper assembles the same call from them.
    with client.responses.stream(model=MODEL, input="weather?", tools=[WEATHER], tool_choice=FORCED,
                                 max_output_tokens=40) as stream:
        final = stream.get_final_response()
    streamed = [o for o in final.output if o.type == "function_call"]
    assert len(streamed) == 1 and set(json.loads(streamed[0].arguments)) == {"city"}


def test_a_call_cut_by_max_output_tokens_is_not_reported_completed(client: openai.OpenAI) -> None:
    # Two tokens cannot hold the forced arguments object, so the call item the stream opened is cut.
    events = list(client.responses.create(model=MODEL, input="weather?", tools=[WEATHER], tool_choice=FORCED,
                                          max_output_tokens=2, temperature=0, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    calls = [i for i in done if i.type == "function_call"]
    assert calls and all(c.status == "incomplete" for c in calls)
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.status) for o in final.response.output] == [(i.type, i.status) for i in done]
    # The unstreamed response has the reply's text as an incomplete message, which the stream sends too.
    full = client.responses.create(model=MODEL, input="weather?", tools=[WEATHER], tool_choice=FORCED,
                                   max_output_tokens=2, temperature=0)
    assert [(o.type, o.status) for o in full.output] == [("message", "incomplete")]
    assert final.response.output[-1].content[0].text == full.output_text


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "x" * (MAX_MODEL_LEN * 64)}, "input"),
    ({"use_beam_search": True}, "use_beam_search"),
])
def test_what_cannot_be_served_is_400_naming_it(server, extra: dict, param: str) -> None:
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, **extra}
    resp = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text


def test_store_is_accepted_and_reported_as_ignored(server) -> None:
    resp = httpx.post(f"{server.base_url}/v1/responses", timeout=30, json={
        "model": MODEL, "input": "hi", "max_output_tokens": 2, "store": True, "reasoning": {"effort": "low"},
        "truncation": "disabled"})
    assert resp.status_code == 200, resp.text
    assert set(resp.headers["x-kubeinfer-ignored-fields"].split(",")) == {"store", "reasoning", "truncation"}
    assert resp.json()["store"] is False
