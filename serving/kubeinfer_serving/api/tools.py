"""Tool calling: checking ``tools`` / ``tool_choice``, the grammar that forces a call, and parsing calls out of text.

What vLLM's OpenAI server does, with the same two parser formats:

- ``tool_choice: "none"`` (or no tools): plain text; the template still sees the tools when
  given (OpenAI's meaning of "none").
- a named function: the output is forced (structured outputs) to that function's
  ``parameters`` schema and returned as one call of it.
- ``"required"``: the output is forced to a JSON list of ``{"name", "parameters"}`` objects
  (one per call, at most one without ``parallel_tool_calls``), each naming a given tool.
- ``"auto"`` (the default with tools): the model writes what it wants and the text is parsed
  in the model's format (:mod:`kubeinfer_serving.api.tool_parsers`: vLLM's ``hermes``,
  ``llama3_json``, ``mistral`` and ``qwen3_xml`` formats, picked by the ``tool_call_parser``
  setting or the chat template).

Streamed, a call's deltas come as the model writes it (:class:`ToolCallStream`): first its id,
type and name, then ``arguments`` fragments as they grow, whose concatenation is the final
``arguments`` string (what the same reply gives unstreamed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.schemas import ChatCompletionRequest, FunctionCallDelta, ToolCall, ToolCallDelta
from kubeinfer_serving.api.structured import forbid_additional_properties
from kubeinfer_serving.api.tool_parsers import (
    START_MARKERS,
    PartialCall,
    arguments_text,
    list_calls,
    make_call,
    new_call_id,
    parse_auto,
    parser_name,
    partial_calls,
    partial_json,
    stable_arguments,
)
from kubeinfer_serving.structured.grammar import GrammarSpec


@dataclass
class ToolPlan:
    """How a chat request uses tools.

    Attributes:
        tools: the request's tools (OpenAI's ``{"type": "function", "function": {...}}``).
        mode: ``none``, ``auto``, ``required`` or ``named``.
        named: the forced function's name (mode ``named``).
        guide: the grammar forcing the call(s) (modes ``required`` and ``named``), else None.
    """

    tools: list[dict[str, Any]]
    mode: str
    named: str | None = None
    guide: GrammarSpec | None = None


def _function(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{i}]",
                       code="invalid_value")
    fn = tool["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise APIError(400, f"tools[{i}].function.name is required", param=f"tools[{i}].function.name",
                       code="invalid_value")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                       param=f"tools[{i}].function.parameters", code="invalid_value")
    return fn


def _parameters(fn: dict[str, Any], forbid_additional: bool) -> dict[str, Any]:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return forbid_additional_properties(params) if forbid_additional else params


def plan_tools(body: ChatCompletionRequest, forbid_additional: bool = True) -> ToolPlan:
    """Check ``tools``/``tool_choice``/``parallel_tool_calls`` and decide how the reply is produced.

    Args:
        forbid_additional: a forced call's arguments get only the properties its schema declares
            (:func:`~kubeinfer_serving.api.structured.forbid_additional_properties`).

    Raises:
        APIError: 400 naming the field for a malformed tool, an unknown ``tool_choice``, a
            named function that is not among the tools, or ``tool_choice`` without tools.
    """
    tools = body.tools or []
    fns = [_function(t, i) for i, t in enumerate(tools)]
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if not isinstance(name, str):
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice", code="invalid_value")
        match = [f for f in fns if f["name"] == name]
        if not match:
            raise APIError(400, f"tool_choice names {name!r}, which is not among tools", param="tool_choice",
                           code="invalid_value")
        spec = GrammarSpec("json", json.dumps(_parameters(match[0], forbid_additional), sort_keys=True))
        return ToolPlan(tools, "named", named=name, guide=spec)
    if choice not in ("none", "auto", "required"):
        raise APIError(400, f"tool_choice {choice!r} is not one of 'none', 'auto', 'required' or a named function",
                       param="tool_choice", code="invalid_value")
    if choice != "none" and not tools:
        raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice", code="invalid_value")
    if choice == "required":
        item = {"anyOf": [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [f["name"]]},
                           "parameters": _parameters(f, forbid_additional)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        } for f in fns]}
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(tools, "required", guide=GrammarSpec("json", json.dumps(schema, sort_keys=True)))
    return ToolPlan(tools, choice)


def parser_for(tokenizer: Any, configured: str | None = None) -> str:
    """The tool-call format of a model (:func:`~kubeinfer_serving.api.tool_parsers.parser_name`)."""
    return parser_name(configured, tokenizer)


def parse_tool_calls(text: str, plan: ToolPlan, parser: str) -> tuple[str | None, list[ToolCall]]:
    """Split a finished reply into (content, tool calls) under ``plan``.

    Args:
        text: the generated text.
        plan: from :func:`plan_tools`.
        parser: a format of :data:`~kubeinfer_serving.api.tool_parsers.PARSERS` (used in ``auto`` mode).

    Returns:
        (content or None, calls). With no call found the text is the content, unchanged; a
        forced call whose JSON is incomplete (cut by ``max_tokens``) is returned as content.
    """
    if plan.mode == "named":
        try:
            args = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        call = make_call(plan.named, args)
        return None, [call] if call else []
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(items, list):
            return text, []
        calls = [make_call(it.get("name"), it.get("parameters")) for it in items if isinstance(it, dict)]
        return None, [c for c in calls if c is not None]
    if plan.mode != "auto":
        return text, []
    return parse_auto(text, plan.tools, parser)


def partial_tool_calls(text: str, plan: ToolPlan, parser: str) -> list[PartialCall]:
    """The calls an unfinished reply has written so far under ``plan``, each with the certain start of its arguments.

    ``named``: the reply is the arguments object; ``required``: a JSON list of
    ``{"name", "parameters"}``; ``auto``: the model's format
    (:func:`~kubeinfer_serving.api.tool_parsers.partial_calls`); ``none``: no calls.

    Args:
        text: the reply so far.
        plan: from :func:`plan_tools`.
        parser: a format of :data:`~kubeinfer_serving.api.tool_parsers.PARSERS` (used in ``auto`` mode).
    """
    if plan.mode == "named" and plan.named is not None and text.strip():
        try:
            return [PartialCall(plan.named, arguments_text(json.loads(text)))]
        except json.JSONDecodeError:
            parsed = partial_json(text)
            return [PartialCall(plan.named, stable_arguments(*parsed) if parsed is not None else "")]
    if plan.mode == "required":
        return list_calls(text, None, ("parameters",))
    if plan.mode == "auto":
        return partial_calls(text, plan.tools, parser)
    return []


#: A stream reads a reply's calls again once it has grown by 1/REREAD_FRACTION of its length
#: (:meth:`ToolCallStream.call_deltas`).
REREAD_FRACTION = 128


@dataclass
class _SentCall:
    """What a stream has sent of one call: its id, name and the arguments text so far."""

    id: str
    name: str
    arguments: str = ""


class ToolCallStream:
    """Streams a reply's content while holding back text that may turn out to be a tool call.

    Forced modes (``named``, ``required``) hold everything; ``auto`` with Llama 3 JSON holds
    the reply while it is empty or starts like a call (``{`` or ``<|python_tag|>``) and
    streams it once it cannot; ``auto`` in the other formats streams up to the text that opens
    a call (``<tool_call>``, ``[TOOL_CALLS]``) or a suffix that could begin it. :meth:`finish`
    parses the whole reply.

    The held-back calls stream as OpenAI streams them: :meth:`call_deltas` gives, after each
    :meth:`feed`, the deltas the text so far makes certain (:func:`partial_tool_calls`): per new
    call one with its id, type and name, then ``arguments`` fragments as they grow;
    :meth:`finish_deltas` the rest, so that each call's fragments concatenate to its final
    ``arguments``. When the finished reply turns out not to hold the calls the stream began (a
    call cut off by ``max_tokens``, a later malformed one), what was sent stays sent and
    :meth:`finish` returns the held-back text as content, as the unstreamed answer has it.
    """

    def __init__(self, plan: ToolPlan, parser: str) -> None:
        self.plan = plan
        self.parser = parser
        self.text = ""
        self._sent = 0
        self._content = plan.mode == "none"
        self._calls: list[_SentCall] = []
        self._read = 0  # length of the text at the last reading of its calls

    def _safe_end(self) -> int:
        if self._content:
            return len(self.text)
        if self.plan.mode != "auto":
            return 0
        tag = START_MARKERS.get(self.parser)
        if tag is not None:
            i = self.text.find(tag)
            if i >= 0:
                return i
            for k in range(min(len(tag) - 1, len(self.text)), 0, -1):
                if tag.startswith(self.text[-k:]):
                    return len(self.text) - k
            return len(self.text)
        head = self.text.lstrip()
        tag = "<|python_tag|>"
        if head == "" or head.startswith("{") or tag.startswith(head[:len(tag)]) or head.startswith(tag):
            return 0
        self._content = True
        return len(self.text)

    def feed(self, delta: str) -> str:
        """Add generated text; return the content that can be streamed now."""
        self.text += delta
        end = max(self._sent, self._safe_end())
        out, self._sent = self.text[self._sent:end], end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: (content not yet streamed, tool calls found)."""
        content, calls = parse_tool_calls(self.text, self.plan, self.parser)
        if not calls:
            rest, self._sent = self.text[self._sent:], len(self.text)
            return rest, []
        # Content before the calls (formats with a start marker) that was not streamed yet.
        tag = START_MARKERS.get(self.parser) if self.plan.mode == "auto" else None
        start = self.text.find(tag) if tag is not None else 0
        rest = self.text[self._sent:max(self._sent, start)] if content else ""
        self._sent = len(self.text)
        return rest, calls

    def call_deltas(self) -> list[ToolCallDelta]:
        """The tool-call deltas that the text fed so far makes certain and that were not sent yet.

        Each reading parses the reply so far, so the reply is read again only once it has grown
        by 1/:data:`REREAD_FRACTION` of its length (at least a character) since the last reading:
        every token while it is short, and linear rather than quadratic work over a long one.
        """
        if self._content or len(self.text) - self._read < max(1, len(self.text) // REREAD_FRACTION):
            return []
        self._read = len(self.text)
        return self._advance(partial_tool_calls(self.text, self.plan, self.parser), [])

    def finish_deltas(self, calls: list[ToolCall]) -> list[ToolCallDelta]:
        """The deltas still to send for ``calls`` (from :meth:`finish`): the rest of each begun
        call's arguments, and whole new calls (id, type and name, then the arguments).

        A begun call whose sent arguments are not the start of its final ones (only with a
        model that repeats a key) gets nothing more.
        """
        return self._advance([PartialCall(c.function.name, c.function.arguments) for c in calls],
                             [c.id for c in calls])

    def _advance(self, calls: list[PartialCall], ids: list[str]) -> list[ToolCallDelta]:
        out = []
        for i, call in enumerate(calls):
            if i == len(self._calls):
                self._calls.append(_SentCall(ids[i] if i < len(ids) else new_call_id(), call.name))
                out.append(ToolCallDelta(index=i, id=self._calls[i].id, type="function",
                                         function=FunctionCallDelta(name=call.name, arguments="")))
            sent = self._calls[i]
            if call.name != sent.name:
                break
            if len(call.arguments) > len(sent.arguments) and call.arguments.startswith(sent.arguments):
                out.append(ToolCallDelta(index=i, function=FunctionCallDelta(
                    arguments=call.arguments[len(sent.arguments):])))
                sent.arguments = call.arguments
        return out
