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

While a reply streams, :func:`partial_calls` reads the calls written so far (vLLM's streaming
tool parsers do the same): a call's name once it is complete, and the start of its ``arguments``
text that no later text can change. JSON arguments are read with ``partial_json_parser`` (the
parser vLLM uses), so they grow as the model writes them, string values character by character;
Qwen3 XML arguments grow parameter by parameter, string-typed values character by character.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import partial_json_parser
from partial_json_parser import Allow

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
#: What may precede a Llama 3 JSON call.
PYTHON_TAG = "<|python_tag|>"

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


def arguments_text(args: Any) -> str:
    """A call's ``arguments`` string: ``args`` as JSON (``json.dumps``, non-ASCII kept), ``args``
    itself when it is already text, ``{}`` for None."""
    if args is None:
        args = {}
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def make_call(name: Any, args: Any) -> ToolCall | None:
    """A :class:`ToolCall` of ``name`` with ``args`` (an object, or already its JSON text); None without a name."""
    if not isinstance(name, str) or not name:
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments_text(args)))


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
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):]
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


def _is_text(schema: Any) -> bool:
    """True when a Qwen3 XML parameter's value is kept as written: its schema says ``string``, or there is none."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    return kind == "string" or (kind is None and not isinstance(schema, dict))


def _typed(value: str, schema: Any) -> Any:
    """A Qwen3 XML parameter value as the type its schema declares (strings as written)."""
    value = value.strip("\n")
    if _is_text(schema):
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


@dataclass
class PartialCall:
    """A tool call as far as a streamed reply has written it.

    Attributes:
        name: the function's name (only ever complete).
        arguments: the start of the call's final ``arguments`` string that no later text can
            change (``""`` while none is certain); the whole string once the call is closed.
    """

    name: str
    arguments: str


#: Strings, numbers and literals are read only when complete; objects and arrays may be open.
_OPEN_COLLECTIONS = Allow.OBJ | Allow.ARR
_ARGUMENT_KEYS = ("arguments", "parameters")
_PARAMETER_KEYS = ("parameters", "arguments")
#: Tags that end a Qwen3 XML parameter value (a string value being written stops before a possible start of one).
_QWEN_ENDS = ("</parameter>", "<parameter=", "</function>", "</tool_call>")


def partial_json(raw: str) -> tuple[Any, Any] | None:
    """Read the start of one JSON value with ``partial_json_parser``.

    Returns:
        (the value with only complete strings, numbers and literals, the same plus the string
        being written when the text stops inside one), or None when ``raw`` is blank, is not the
        start of a JSON value or has text after it.
    """
    if not raw.strip():
        return None
    try:
        done = partial_json_parser.loads(raw, _OPEN_COLLECTIONS)
    except (ValueError, IndexError):  # the parser's errors are ValueErrors; an extra closer raises IndexError
        return None
    # A quote closes the string being written, if any (else it opens one, which is dropped as
    # incomplete, or is misplaced): cheaper than the parser's own partial strings, which rescan it.
    try:
        return done, partial_json_parser.loads(raw + '"', _OPEN_COLLECTIONS)
    except (ValueError, IndexError):
        return done, done


def _closed_json(raw: str) -> tuple[Any, Any] | None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value, value


def stable_arguments(done: Any, grown: Any) -> str:
    """The start of a call's final ``arguments`` string that is certain while its object is being written.

    ``json.dumps`` of the object read so far, less the closing brackets of whatever is still
    open; when the reply stops inside a string value, that string's characters so far (never
    half a surrogate pair). A prefix of :func:`arguments_text` of every completion of the object
    (unless a key is repeated: the later value replaces the earlier one).

    Args:
        done: the arguments read with complete atoms only (:func:`partial_json`'s first value).
        grown: the same read with the string being written (its second value).

    Returns:
        The certain prefix; ``""`` unless both are objects.
    """
    if not isinstance(done, dict) or not isinstance(grown, dict):
        return ""
    certain = arguments_text(done).rstrip("]}")
    longer = arguments_text(grown).rstrip("]}")
    if longer == certain or not longer.endswith('"') or not longer.startswith(certain):
        return certain
    longer = longer[:-1]  # the closing quote the partial parser added
    if longer and "\ud800" <= longer[-1] <= "\udbff":  # half a surrogate pair: the other half may follow
        longer = longer[:-1]
    return longer if len(longer) > len(certain) else certain


def _without_partial_tag(text: str, tags: Collection[str]) -> str:
    """``text`` less a suffix that could be the start of one of ``tags``."""
    for k in range(min(max(map(len, tags)) - 1, len(text)), 0, -1):
        if any(tag.startswith(text[-k:]) for tag in tags):
            return text[:-k]
    return text


def _object_call(parsed: tuple[Any, Any] | None, closed: bool, names: Collection[str] | None,
                 keys: tuple[str, ...]) -> PartialCall | None:
    """The call in a (partly) read ``{"name": ..., keys[0]: {...}}`` object; None when it does
    not (yet) name a function of ``names`` (any name when None)."""
    if parsed is None or not isinstance(parsed[0], dict) or not isinstance(parsed[1], dict):
        return None
    done, grown = parsed
    name = done.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    if closed:  # what the finished reply's parse gives: the first of keys present
        return PartialCall(name, arguments_text(next((done[k] for k in keys if k in done), None)))
    # Only the first key streams: the finished parse prefers it wherever it comes.
    return PartialCall(name, stable_arguments(done.get(keys[0]), grown.get(keys[0])))


def list_calls(raw: str, names: Collection[str] | None, keys: tuple[str, ...]) -> list[PartialCall]:
    """The calls in (the start of) a JSON list of call objects (Mistral before v11, ``tool_choice: "required"``).

    Args:
        raw: the list's text so far.
        names: the functions a call may name (any when None).
        keys: where the arguments are, the preferred key first.
    """
    whole = _closed_json(raw)
    parsed = whole or partial_json(raw)
    if parsed is None or not isinstance(parsed[0], list) or not isinstance(parsed[1], list):
        return []
    complete = whole is not None
    done, grown = parsed
    out = []
    for j, item in enumerate(grown):
        closed = complete or j < len(grown) - 1  # a later item closed this one
        call = _object_call((done[j] if j < len(done) else None, item), closed, names, keys)
        if call is None:
            break
        out.append(call)
    return out


def _hermes_partial(text: str, names: Collection[str]) -> list[PartialCall]:
    start = text.find("<tool_call>")
    out: list[PartialCall] = []
    for m in _HERMES_BLOCK.finditer(text, start) if start >= 0 else ():
        closed = m.group(0).endswith("</tool_call>")
        body = m.group(1) if closed else _without_partial_tag(m.group(1), ("</tool_call>",))
        call = _object_call(_closed_json(body) if closed else partial_json(body), closed, names, _ARGUMENT_KEYS)
        if call is None:
            break
        out.append(call)
    return out


def _llama3_partial(text: str, names: Collection[str]) -> list[PartialCall]:
    body = text.lstrip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):]
    if not body.startswith("{"):
        return []
    out: list[PartialCall] = []
    dec, i = json.JSONDecoder(), 0
    while True:
        while i < len(body) and body[i] in "; \t\r\n":
            i += 1
        if i >= len(body):
            return out
        try:
            value, i = dec.raw_decode(body, i)
        except json.JSONDecodeError:  # the last object, still being written
            call = _object_call(partial_json(body[i:]), False, names, _PARAMETER_KEYS)
            return out + [call] if call is not None else out
        call = _object_call((value, value), True, names, _PARAMETER_KEYS)
        if call is None:
            return out
        out.append(call)


def _mistral_partial(text: str, names: Collection[str]) -> list[PartialCall]:
    start = text.find("[TOOL_CALLS]")
    segments = text[start:].split("[TOOL_CALLS]")[1:] if start >= 0 else []
    out: list[PartialCall] = []
    for k, segment in enumerate(segments):
        closed = k < len(segments) - 1  # a later marker ended it
        segment = (segment if closed else _without_partial_tag(segment, ("[TOOL_CALLS]",))).strip()
        if segment.startswith("["):  # before v11: a JSON list of {"name", "arguments"}
            whole = _closed_json(segment) if closed else None
            found = list_calls(segment, names, _ARGUMENT_KEYS)
            out += found
            if closed and (whole is None or not isinstance(whole[0], list) or len(found) != len(whole[0])):
                return out
            continue
        name, sep, args = segment.partition("[ARGS]")  # v11+: name[ARGS]{...}, or name{...}
        if not sep:
            brace = segment.find("{")
            if brace < 0:
                return out  # the name is not finished
            name, args = segment[:brace], segment[brace:]
        name = name.strip()
        if name not in names:
            return out
        if closed:
            values = json_values(args.strip())
            if not values or len(values) != 1 or not isinstance(values[0], dict):
                return out
            out.append(PartialCall(name, arguments_text(values[0])))
            continue
        parsed = partial_json(args)
        out.append(PartialCall(name, stable_arguments(*parsed) if parsed is not None else ""))
    return out


def _qwen3_partial(text: str, tools: dict[str, dict[str, Any]]) -> list[PartialCall]:
    start = text.find("<tool_call>")
    out: list[PartialCall] = []
    for block in _HERMES_BLOCK.finditer(text, start) if start >= 0 else ():
        fn = _QWEN_FUNCTION.search(block.group(1))
        if fn is None or fn.group(1) not in tools:
            break
        props = (tools[fn.group(1)].get("parameters") or {}).get("properties") or {}
        if block.group(0).endswith("</tool_call>") or fn.group(0).endswith("</function>"):
            args = {key: _typed(value, props.get(key)) for key, value in _QWEN_PARAMETER.findall(fn.group(2))}
            out.append(PartialCall(fn.group(1), arguments_text(args)))
            continue
        out.append(PartialCall(fn.group(1), _qwen3_open_arguments(fn.group(2), props)))
        break
    return out


def _qwen3_open_arguments(body: str, props: dict[str, Any]) -> str:
    """The certain start of an open Qwen3 XML function's arguments: its finished parameters, then
    the value of a string parameter being written, less trailing newlines and a possible closing tag."""
    items: list[str] = []
    seen: set[str] = set()
    for m in _QWEN_PARAMETER.finditer(body):
        key = m.group(1)
        if key in seen:  # a repeated parameter replaces the earlier value: nothing more is certain
            break
        seen.add(key)
        if m.group(0).endswith("</parameter>") or body.startswith("<parameter=", m.end()):
            items.append(f"{json.dumps(key, ensure_ascii=False)}: "
                         f"{json.dumps(_typed(m.group(2), props.get(key)), ensure_ascii=False)}")
            continue
        if _is_text(props.get(key)):
            value = body[m.start(2):].lstrip("\n")
            cut = value.rfind("<")
            if cut >= 0 and any(t.startswith(value[cut:]) or value[cut:].startswith(t) for t in _QWEN_ENDS):
                value = value[:cut]
            value = value.rstrip("\n")
            items.append(f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)[:-1]}")
        break
    return "{" + ", ".join(items)


def partial_calls(text: str, tools: list[dict[str, Any]], parser: str) -> list[PartialCall]:
    """The calls an unfinished ``auto``-mode reply has written so far, in format ``parser``.

    Every call but possibly the last is closed. Only calls that name one of ``tools`` count, and
    reading stops at the first that does not (the finished reply may still turn out not to be
    calls: :func:`parse_auto` decides).

    Args:
        text: the reply so far.
        tools: the request's tools (OpenAI's chat form).
        parser: a format of :data:`PARSERS`.

    Returns:
        The calls, each with the certain start of its ``arguments`` (:class:`PartialCall`).
    """
    functions = {t["function"]["name"]: t["function"] for t in tools}
    return _PARTIAL[parser](text, functions)


_PARTIAL = {HERMES: _hermes_partial, LLAMA3_JSON: _llama3_partial, MISTRAL: _mistral_partial,
            QWEN3_XML: _qwen3_partial}
