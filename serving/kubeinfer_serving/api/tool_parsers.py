"""The tool-call formats models write in ``tool_choice: "auto"`` mode, by vLLM's ``--tool-call-parser`` names.

Each parser splits a finished reply into (content, calls); a reply that holds no well-formed call
of a given tool stays content, unchanged. Formats (as vLLM's parsers in
vllm/entrypoints/openai/tool_parsers/ read them):

* ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks after optional content;
* ``llama3_json`` (Llama 3.1-3.3): the whole reply is ``{"name": ..., "parameters": {...}}``
  objects separated by ``;``, optionally after ``<|python_tag|>``;
* ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (tokenizers before
  v11) or ``name{...}`` / ``name[ARGS]{...}`` per call (v11 and later), after optional content;
* ``qwen3_xml`` (alias ``qwen3_coder``; Qwen3-Coder): ``<tool_call><function=NAME><parameter=KEY>
  VALUE</parameter>...</function></tool_call>``; values are converted to the type the tool's
  schema gives the parameter (strings stay as written, others are read as JSON when they parse).

:func:`parser_name` picks the format: the configured name, else the chat template's hints.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from kubeinfer_serving.api.schemas import FunctionCall, ToolCall

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
MISTRAL = "mistral"
QWEN3_XML = "qwen3_xml"
#: vLLM's parser names served here -> the format.
PARSERS = {HERMES: HERMES, LLAMA3_JSON: LLAMA3_JSON, MISTRAL: MISTRAL, QWEN3_XML: QWEN3_XML,
           "qwen3_coder": QWEN3_XML}
#: Text that opens a call, per format whose calls may follow content (what a stream holds back).
START_MARKERS = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]", QWEN3_XML: "<tool_call>"}

_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_QWEN_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_QWEN_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


def parser_name(configured: str | None, tokenizer: Any) -> str:
    """The tool-call format of a model: ``configured`` (a vLLM parser name) when given, else from
    its chat template: ``<function=`` means Qwen3 XML, ``<tool_call>`` Hermes, ``[TOOL_CALLS]``
    Mistral, anything else Llama 3 JSON.

    Raises:
        ValueError: ``configured`` is not one of :data:`PARSERS`.
    """
    if configured is not None:
        if configured not in PARSERS:
            raise ValueError(f"tool-call parser {configured!r} is not one of {', '.join(sorted(PARSERS))}")
        return PARSERS[configured]
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(str(v) for v in template.values())
    if "<tool_call>" in template:
        return QWEN3_XML if "<function=" in template else HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    return LLAMA3_JSON


def new_call_id() -> str:
    """A tool-call id like OpenAI's (``call_`` + 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def make_call(name: Any, args: Any) -> ToolCall | None:
    """A :class:`ToolCall` of ``name`` with ``args`` (an object, or already its JSON text); None without a name."""
    if not isinstance(name, str) or not name:
        return None
    if args is None:
        args = {}
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=text))


def json_values(text: str, separators: str = "; \t\r\n") -> list[Any] | None:
    """Parse ``text`` as JSON values separated by ``separators``; None if it is not only that."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in separators:
            i += 1
        if i >= len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.append(value)


def _named(obj: Any, names: set[str], *arg_keys: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = next((obj[k] for k in arg_keys if k in obj), None)
    return make_call(obj["name"], args)


def _hermes(text: str, tools: dict[str, dict[str, Any]]) -> tuple[str | None, list[ToolCall]]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for block in _HERMES_BLOCK.findall(text[start:]):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        call = _named(obj, set(tools), "arguments", "parameters")
        if call is None:
            return text, []
        calls.append(call)
    return text[:start].strip() or None, calls


def _llama3_json(text: str, tools: dict[str, dict[str, Any]]) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):]
    if not body.startswith("{"):
        return text, []
    objs = json_values(body)
    calls = [_named(o, set(tools), "parameters", "arguments") for o in objs or []]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, [c for c in calls if c is not None]


def _mistral(text: str, tools: dict[str, dict[str, Any]]) -> tuple[str | None, list[ToolCall]]:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return text, []
    calls: list[ToolCall] = []
    for segment in text[start:].split("[TOOL_CALLS]")[1:]:
        segment = segment.strip()
        if segment.startswith("["):  # before v11: a JSON list of {"name", "arguments"}
            values = json_values(segment)
            items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
            found = [_named(o, set(tools), "arguments", "parameters") for o in items or []]
            if not found or any(c is None for c in found):
                return text, []
            calls += [c for c in found if c is not None]
            continue
        name, sep, args = segment.partition("[ARGS]")  # v11+: name[ARGS]{...}, or name{...}
        if not sep:
            brace = segment.find("{")
            name, args = (segment[:brace], segment[brace:]) if brace >= 0 else (segment, "")
        values = json_values(args.strip())
        name = name.strip()
        if name not in tools or not values or len(values) != 1 or not isinstance(values[0], dict):
            return text, []
        call = make_call(name, values[0])
        if call is not None:
            calls.append(call)
    return text[:start].strip() or None, calls


def _typed(value: str, schema: Any) -> Any:
    """A Qwen3 XML parameter value as the type its schema declares (strings as written)."""
    value = value.strip("\n")
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "string" or (kind is None and not isinstance(schema, dict)):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _qwen3_xml(text: str, tools: dict[str, dict[str, Any]]) -> tuple[str | None, list[ToolCall]]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for block in _HERMES_BLOCK.findall(text[start:]):
        fn = _QWEN_FUNCTION.search(block)
        if fn is None or fn.group(1) not in tools:
            return text, []
        props = (tools[fn.group(1)].get("parameters") or {}).get("properties") or {}
        args = {key: _typed(value, props.get(key)) for key, value in _QWEN_PARAMETER.findall(fn.group(2))}
        call = make_call(fn.group(1), args)
        if call is not None:
            calls.append(call)
    if not calls:
        return text, []
    return text[:start].strip() or None, calls


_PARSE = {HERMES: _hermes, LLAMA3_JSON: _llama3_json, MISTRAL: _mistral, QWEN3_XML: _qwen3_xml}


def parse_auto(text: str, tools: list[dict[str, Any]], parser: str) -> tuple[str | None, list[ToolCall]]:
    """Split a finished ``auto``-mode reply into (content or None, calls) in format ``parser``.

    Args:
        text: the generated text.
        tools: the request's tools (OpenAI's chat form); calls must name one of them.
        parser: a format of :data:`PARSERS`.

    Returns:
        (content, calls); with no well-formed call the text is the content, unchanged.
    """
    functions = {t["function"]["name"]: t["function"] for t in tools}
    return _PARSE[parser](text, functions)
