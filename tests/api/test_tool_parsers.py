"""Tool-call formats selectable by vLLM's parser names: hermes, llama3_json, mistral, qwen3_xml (qwen3_coder).

End to end, a server configured with each parser gets a reply forced (``guided_choice``) to a
call written in that format, in ``tool_choice: "auto"`` mode, and must answer with OpenAI's
``tool_calls``, streamed and not, with the content before the call kept as content; streamed,
the arguments arrive in pieces as the model writes them and add up to the unstreamed arguments.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.api.tool_parsers import PARSERS, parse_auto, parser_name
from kubeinfer_serving.api.tools import ToolCallStream, ToolPlan, parse_tool_calls
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry

from tests.api.conftest import MAX_MODEL_LEN, MODEL, ServerThread

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
TOOLS = [WEATHER]
ARGS = {"city": "Oslo", "days": 3}

#: parser -> (the reply as the model family writes it, the content before the call).
REPLIES = {
    "hermes": ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n'
               "</tool_call>", "Let me look."),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}', None),
    "mistral": ('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "days": 3}', "Checking."),
    "qwen3_xml": ("Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
                  "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", "Sure."),
}


def test_each_format_parses_and_rejects_what_is_not_a_call() -> None:
    for parser, (text, content) in REPLIES.items():
        got, calls = parse_auto(text, TOOLS, parser)
        assert got == content and len(calls) == 1, parser
        assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == ARGS, parser
    old_mistral = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}, ' \
                  '{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    _, calls = parse_auto(old_mistral, TOOLS, "mistral")
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Oslo", "Rome"]
    two = '[TOOL_CALLS]get_weather{"city": "Oslo"}[TOOL_CALLS]get_weather{"city": "Rome"}'
    assert len(parse_auto(two, TOOLS, "mistral")[1]) == 2
    for parser, text in (("mistral", "[TOOL_CALLS]rm_rf[ARGS]{}"), ("mistral", "[TOOL_CALLS]get_weather[ARGS]{bad"),
                         ("qwen3_xml", "<tool_call><function=rm_rf></function></tool_call>"),
                         ("hermes", '<tool_call>{"name": "get_weather", "argu'), ("llama3_json", "It is sunny.")):
        assert parse_auto(text, TOOLS, parser) == (text, []), (parser, text)
    # Shapes a model (or a client's guided_choice) may write that are not calls: never an exception.
    odd = {"hermes": ['<tool_call>{"name": ["get_weather"]}</tool_call>', "<tool_call>[1, 2]</tool_call>"],
           "llama3_json": ['{"name": ["get_weather"]}', '{"name": 5}', "[1]", "{}"],
           "mistral": ['[TOOL_CALLS][{"name": {"a": 1}}]', "[TOOL_CALLS][1, 2]", '[TOOL_CALLS]{"x": 1}',
                       "[TOOL_CALLS][ARGS]", '[TOOL_CALLS][["get_weather"]]'],
           "qwen3_xml": ["<tool_call><function=></function></tool_call>", "<tool_call>junk</tool_call>"]}
    for parser, texts in odd.items():
        for text in texts:
            assert parse_auto(text, TOOLS, parser) == (text, []), (parser, text)


def test_parser_names_and_template_hints() -> None:
    class Tok:
        def __init__(self, template: str) -> None:
            self.chat_template = template

    assert parser_name("qwen3_coder", Tok("")) == "qwen3_xml" and set(PARSERS) >= {
        "hermes", "llama3_json", "mistral", "qwen3_xml", "qwen3_coder"}
    assert parser_name(None, Tok("<tool_call><function=")) == "qwen3_xml"
    assert parser_name(None, Tok("x <tool_call> y")) == "hermes"
    assert parser_name(None, Tok("[TOOL_CALLS]")) == "mistral"
    assert parser_name(None, Tok("")) == "llama3_json"
    with pytest.raises(ValueError):
        parser_name("pythonic", Tok(""))
    with pytest.raises(ValueError):
        ServerSettings(tool_call_parser="pythonic")


def test_streams_hold_back_only_the_call() -> None:
    plan = ToolPlan(TOOLS, "auto")
    for parser in ("mistral", "qwen3_xml"):
        text, content = REPLIES[parser]
        stream = ToolCallStream(plan, parser)
        sent = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
        rest, calls = stream.finish()
        assert (sent + rest).strip() == content and len(calls) == 1, parser


RUN = {"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {
    "code": {"type": "string"}, "opts": {"type": "object"}, "n": {"type": "number"}}}}}
#: (mode, parser, reply): replies whose arguments are hard to stream a piece at a time: escapes,
#: a surrogate pair, nested values, numbers that grow, closing tags and markers inside strings,
#: several calls, the arguments before the name; and (WHOLE) arguments under the secondary key,
#: which come whole once the call is closed (the finished parse prefers the first key wherever it comes).
WHOLE = [("auto", "hermes", '<tool_call>{"name": "get_weather", "parameters": {"city": "X"}}</tool_call>')]
HARD = [
    ("auto", "hermes", '<tool_call>{"arguments": {"city": "X"}, "name": "get_weather"}</tool_call>'),
    ("auto", "hermes", 'Hi <tool_call>{"name": "run", "arguments": {"code": "print(\\"a\\")\\n\\ud83d\\ude00 é '
                       '</tool", "opts": {"x": [1, 2.50, true, null, {"y": "]}"}]}, "n": -1.5e3}}</tool_call>\n'
                       '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 12345}}</tool_call>'),
    ("auto", "llama3_json", '{"name": "run", "parameters": {"code": "x = {1: [2]}", "n": 10}}; '
                            '{"name": "get_weather", "parameters": {"city": "a;b"}}'),
    ("auto", "mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}, '
                        '{"name": "run", "arguments": {"code": "]}"}}]'),
    ("auto", "mistral", 'x[TOOL_CALLS]get_weather{"city": "Oslo"}[TOOL_CALLS]run[ARGS]{"code": "a[TOOL_CALLS"}'),
    ("auto", "qwen3_xml", '<tool_call>\n<function=run>\n<parameter=code>\nif a < b:\n    x = "</para"\n\n'
                          '</parameter>\n<parameter=opts>\n{"a": 1}\n</parameter>\n<parameter=n>\n7\n</parameter>\n'
                          '</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome'
                          '<parameter=days>\n2\n</function>\n</tool_call>'),
    ("named", "hermes", '{"city": "Oslo \\u00e9", "days": 30}'),
    ("required", "hermes", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
                           '{"name": "run", "parameters": {"code": "x"}}]'),
]


def _stream(plan: ToolPlan, parser: str, text: str, step: int) -> tuple[str, dict[int, list], dict[int, str]]:
    """Feed ``text`` ``step`` characters at a time; (content, index -> deltas, index -> arguments so far
    checked against the finished parse after every piece)."""
    stream, content, deltas = ToolCallStream(plan, parser), "", {}
    final = [c.function.arguments for c in parse_tool_calls(text, plan, parser)[1]]
    for i in range(0, len(text), step):
        content += stream.feed(text[i:i + step])
        for d in stream.call_deltas():
            deltas.setdefault(d.index, []).append(d)
        for k, ds in deltas.items():
            if final:  # what is sent is always the start of the final arguments
                assert final[k].startswith("".join(d.function.arguments or "" for d in ds)), (text[:i + step], k)
    rest, calls = stream.finish()
    for d in stream.finish_deltas(calls):
        deltas.setdefault(d.index, []).append(d)
    return content + rest, deltas, {k: "".join(d.function.arguments or "" for d in ds) for k, ds in deltas.items()}


def test_streamed_arguments_grow_and_add_up_to_the_final_ones() -> None:
    cases = [("auto", parser, text) for parser, (text, _) in REPLIES.items()] + HARD + WHOLE
    for mode, parser, text in cases:
        plan = ToolPlan(TOOLS + [RUN], mode, named="get_weather" if mode == "named" else None)
        content, calls = parse_tool_calls(text, plan, parser)
        assert calls, (parser, text)
        for step in (1, 3, 8):
            streamed, deltas, args = _stream(plan, parser, text, step)
            assert sorted(deltas) == list(range(len(calls))), (parser, text)
            for k, call in enumerate(calls):
                first, *rest = deltas[k]
                assert first.id.startswith("call_") and first.type == "function", (parser, text)
                assert first.function.name == call.function.name and first.function.arguments == ""
                assert all(d.id is None and d.function.name is None for d in rest)
                assert args[k] == call.function.arguments, (parser, text, step)
            assert streamed.strip() == (content or "").strip(), (parser, text)
        _, deltas, _ = _stream(plan, parser, text, 1)
        pieces = len([d for d in deltas[0] if d.function.arguments])
        assert pieces == 1 if (mode, parser, text) in WHOLE else pieces > 1, (parser, text)


def test_a_call_cut_off_keeps_what_was_sent_and_loses_no_text() -> None:
    plan = ToolPlan(TOOLS, "auto")
    for parser, (text, _) in REPLIES.items():
        cut = text[:text.index("Oslo") + 2]  # max_tokens ends the reply inside the call
        streamed, deltas, args = _stream(plan, parser, cut, 2)
        assert deltas[0][0].function.name == "get_weather" and args[0].startswith('{"city": "'), parser
        content, calls = parse_tool_calls(cut, plan, parser)
        if calls:  # Qwen3 XML reads an unclosed parameter as far as it goes
            assert args[0] == calls[0].function.arguments == '{"city": "Os"}' and parser == "qwen3_xml"
        else:  # not a call: the unstreamed answer's content, in full; the call's start stays sent
            assert content == cut and streamed.strip() == cut.strip() and args[0] == '{"city": "Os', parser


@pytest.fixture(scope="module", params=sorted(REPLIES))
def parser_server(request) -> Iterator[tuple[str, ServerThread]]:
    catalogue = Catalogue(models=[ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True,
                                             max_model_len=MAX_MODEL_LEN)], max_num_seqs=2)
    settings = ServerSettings(host="127.0.0.1", port=0, tool_call_parser=request.param)
    srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"), settings=settings))
    srv.start()
    yield request.param, srv
    srv.stop()


def test_configured_parser_end_to_end(parser_server: tuple[str, ServerThread]) -> None:
    parser, srv = parser_server
    text, content = REPLIES[parser]
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS, "max_tokens": 400,
          "extra_body": {"guided_choice": [text]}}
    out = client.chat.completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", ARGS)]
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert streamed.strip() == (content or "")
    assert (deltas[0].id, deltas[0].type, deltas[0].function.name) == (deltas[0].id, "function", "get_weather")
    assert deltas[0].id.startswith("call_") and {d.index for d in deltas} == {0}
    # The arguments stream in pieces, in chunks of their own after the content, and add up to the
    # unstreamed call's arguments string exactly.
    pieces = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(pieces) > 1 and "".join(pieces) == choice.message.tool_calls[0].function.arguments
    first_call = next(i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls)
    assert all(not c.choices[0].delta.content for c in chunks[first_call:])
    assert len([c for c in chunks if any(d.function.arguments for d in c.choices[0].delta.tool_calls or [])]) > 1
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
