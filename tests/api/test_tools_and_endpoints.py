"""Tool calling, vLLM's small endpoints and defaults, on a single-model server whose template renders tools."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from kubeinfer_serving import __version__
from kubeinfer_serving.__main__ import build_provider
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.api.tool_parsers import HERMES, LLAMA3_JSON
from kubeinfer_serving.api.tools import ToolCallStream, ToolPlan, parse_tool_calls
from kubeinfer_serving.config import ServerSettings

from tests.api.conftest import MAX_MODEL_LEN, ServerThread

NAME = "tiny-hermes"

#: A Hermes/Qwen-style template: tools in the system turn, <tool_call> blocks, tool responses.
HERMES_TEMPLATE = """{{- bos_token }}
{%- if tools %}<|start_header_id|>system<|end_header_id|>

# Tools
<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|eot_id|>
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|eot_id|>
{%- elif m.role == 'tool' %}<|start_header_id|>tool<|end_header_id|>

<tool_response id="{{ m.tool_call_id }}">{{ m.content }}</tool_response><|eot_id|>
{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{{ m.content }}{% if not (loop.last and continue_final_message) %}<|eot_id|>{% endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}
{%- if greeting %}{{ greeting }}{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def hermes_server(model_dir: Path, tmp_path_factory) -> Iterator[ServerThread]:
    """A single-model server over a copy of the tiny model with a tool-aware (Hermes) chat template."""
    d = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(model_dir, d)
    (d / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    provider = build_provider(ServerSettings(model_dir=d, served_model_name=NAME, device="cpu", max_num_seqs=4,
                                             max_model_len=MAX_MODEL_LEN))
    srv = ServerThread(create_app(provider, settings=ServerSettings(host="127.0.0.1", port=0)))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hclient(hermes_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{hermes_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _rendered(server: ServerThread, **body) -> str:
    r = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    return httpx.post(f"{server.base_url}/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]


def test_tools_and_tool_messages_reach_the_template(hermes_server: ServerThread) -> None:
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 degrees"},
    ]
    text = _rendered(hermes_server, messages=history, tools=[WEATHER])
    assert '"name": "get_weather"' in text and "Weather in a city" in text  # the tool definition
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}' in text
    assert '<tool_response id="call_1">-3 degrees</tool_response>' in text
    # chat_template_kwargs reach the template; continue_final_message leaves the last turn open.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    assert _rendered(hermes_server, messages=msgs[:1], chat_template_kwargs={"greeting": "HOWDY"}).endswith("HOWDY")
    open_turn = _rendered(hermes_server, messages=msgs, add_generation_prompt=False, continue_final_message=True)
    assert open_turn.endswith("Hel")


def test_named_and_required_tool_choice_return_valid_calls(hclient: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    for seed in range(3):
        out = hclient.chat.completions.create(
            model=NAME, messages=msgs, tools=[WEATHER, TIME], max_tokens=120, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    out = hclient.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=150, temperature=0.8, seed=4)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    fn = {"get_weather": WEATHER, "get_time": TIME}[calls[0].function.name]["function"]
    jsonschema.validate(json.loads(calls[0].function.arguments), fn["parameters"])


def test_tool_calls_stream_as_openai_streams_them(hclient: openai.OpenAI) -> None:
    kw = dict(model=NAME, messages=[{"role": "user", "content": "time?"}], tools=[WEATHER, TIME], max_tokens=60,
              temperature=0.5, seed=2, tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = hclient.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    name, args, ids, reasons, pieces = "", "", [], [], 0
    for chunk in hclient.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    ids.append(tc.id)
                name += tc.function.name or ""
                args += tc.function.arguments or ""
                pieces += bool(tc.function.arguments)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    # The forced call's arguments stream as they are generated and add up to the unstreamed ones.
    assert name == "get_time" and args == whole.function.arguments and pieces > 1
    assert len(ids) == 1 and reasons == ["tool_calls"]
    # tool_choice "required": the calls of the forced list stream the same way.
    kw = {**kw, "tool_choice": "required", "max_tokens": 150, "temperature": 0.8, "seed": 4}
    calls = hclient.chat.completions.create(**kw).choices[0].message.tool_calls
    streamed: dict[int, list] = {}
    for chunk in hclient.chat.completions.create(stream=True, **kw):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            streamed.setdefault(tc.index, []).append(tc)
    assert [ds[0].function.name for ds in streamed.values()] == [c.function.name for c in calls]
    assert ["".join(d.function.arguments or "" for d in ds) for ds in streamed.values()] == [
        c.function.arguments for c in calls]
    assert len([d for d in streamed[0] if d.function.arguments]) > 1


def test_bad_tool_requests_are_400(hclient: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "x"}]
    for kw, param in [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                       "tool_choice"),
                      ({"tool_choice": "required"}, "tool_choice"),
                      ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name")]:
        with pytest.raises(openai.BadRequestError) as err:
            hclient.chat.completions.create(model=NAME, messages=msgs, max_tokens=2, **kw)
        assert err.value.body["param"] == param


def test_auto_tool_calls_are_parsed_in_both_formats() -> None:
    plan = ToolPlan([WEATHER, TIME], "auto")
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n' \
           '</tool_call><tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>'
    content, calls = parse_tool_calls(text, plan, HERMES)
    assert content == "Let me check." and [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo", "unit": "c"}
    content, calls = parse_tool_calls('{"name": "get_time", "parameters": {"zone": "cet"}}; '
                                      '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "f"}}',
                                      plan, LLAMA3_JSON)
    assert content is None and [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert parse_tool_calls("<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}", plan, LLAMA3_JSON)[1]
    # Not a call: unknown function, broken JSON, or plain prose stay content.
    for t in ('{"name": "rm_rf", "parameters": {}}', '{"name": "get_time", "param', "It is sunny."):
        assert parse_tool_calls(t, plan, LLAMA3_JSON) == (t, [])
    # Streaming holds back only what may be a call.
    s = ToolCallStream(plan, HERMES)
    assert s.feed("Sure, ") == "Sure, " and s.feed("<tool") == "" and s.feed("_call>{\"name\": ") == ""
    s.feed('"get_time", "arguments": {"zone": "utc"}}</tool_call>')
    rest, calls = s.finish()
    assert rest == "" and calls[0].function.name == "get_time"
    s = ToolCallStream(plan, LLAMA3_JSON)
    assert s.feed("  ") == "" and s.feed("Hello") == "  Hello" and s.feed(" {") == " {"
    assert s.finish() == ("", [])


def test_model_is_optional_with_one_model_and_small_endpoints(hermes_server: ServerThread,
                                                              hclient: openai.OpenAI) -> None:
    base = hermes_server.base_url
    r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == NAME
    assert r.json()["system_fingerprint"] == f"kubeinfer-{__version__}"
    assert len(r.headers["x-request-id"]) == 32  # generated
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                        "max_tokens": 2}, headers={"X-Request-Id": "abc-123"},
                   timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    with httpx.stream("POST", f"{base}/v1/chat/completions", headers={"X-Request-Id": "s-1"}, timeout=60,
                      json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}) as s:
        assert s.headers["x-request-id"] == "s-1"
        s.read()
    assert httpx.get(f"{base}/version", timeout=10).json() == {"version": __version__}
    tok = httpx.post(f"{base}/tokenize", json={"prompt": "hello world", "return_token_strs": True}, timeout=10).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == MAX_MODEL_LEN
    assert httpx.post(f"{base}/detokenize", json={"tokens": tok["tokens"]}, timeout=10).json()["prompt"] \
        .endswith("hello world")
    bad = httpx.post(f"{base}/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    # chat echo: the final assistant message is prepended to the continuation.
    out = hclient.chat.completions.create(
        model=NAME, max_tokens=3, extra_body={"echo": True, "continue_final_message": True,
                                              "add_generation_prompt": False, "ignore_eos": True},
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}])
    assert out.choices[0].message.content.startswith("Well,")
