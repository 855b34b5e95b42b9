"""A ``/v1/responses`` request as the chat request it means, so both routes share one generation path.

The mapping (OpenAI's Responses API reference; vLLM's ``serving_responses.py`` maps the same way):

* ``instructions`` -> a leading ``system`` message;
* ``input`` text -> one ``user`` message; ``input`` items: ``message`` items (``role`` with
  ``content`` as text or ``input_text`` / ``output_text`` parts) -> chat messages; ``function_call``
  items -> the assistant's ``tool_calls`` (consecutive calls join one assistant message);
  ``function_call_output`` items -> ``tool`` messages with their ``call_id``; ``reasoning`` items
  are dropped (they are not part of the conversation a chat template renders);
* function ``tools`` (``{"type": "function", "name", "parameters", ...}``) -> chat tools;
  ``tool_choice`` ``{"type": "function", "name"}`` -> chat's named form;
* ``text.format`` ``json_schema`` / ``json_object`` -> ``response_format``;
* ``max_output_tokens`` -> ``max_completion_tokens``; the sampling fields pass as they are.

What needs state or capabilities this server lacks is refused with 400 naming the field: other
tool types (web search, file search, computer use, MCP...), image/file/audio input parts,
``item_reference`` items, ``previous_response_id``, ``conversation``, ``prompt``,
``background: true``, ``n`` other than 1 and ``top_logprobs``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.responses_protocol import ResponsesRequest
from kubeinfer_serving.api.schemas import ChatCompletionRequest, _SamplingFields

#: Input content part types that carry text.
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_STATELESS = "this server keeps no responses (stateless); send the whole conversation in input"


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def check_stateless(body: ResponsesRequest) -> None:
    """Refuse what needs server-side state or is not served (see the module docstring).

    Raises:
        APIError: 400 naming the field.
    """
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(body, name) is not None:
            raise _bad(name, f"{name} is not supported: {_STATELESS}", "unsupported_parameter")
    if body.background:
        raise _bad("background", "background is not supported: responses are answered in the request",
                   "unsupported_parameter")
    if body.n != 1:
        raise _bad("n", "n must be 1 for /v1/responses")
    if body.top_logprobs:
        raise _bad("top_logprobs", "top_logprobs is not supported on /v1/responses (use /v1/chat/completions)",
                   "unsupported_parameter")


def _text(content: Any, param: str) -> str:
    """The text of a ``content`` value: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, f"{param} must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _bad(f"{param}[{j}]", f"content part type {kind!r} is not supported (text only)",
                       "unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value and key != "arguments":
        raise _bad(f"{param}.{key}", f"{param}.{key} must be a non-empty string")
    return value


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat ``messages`` of ``instructions`` + ``input``.

    Raises:
        APIError: 400 naming ``input[i]...`` for an item this server cannot render.
    """
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    for i, item in enumerate(body.input):
        param = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{param}.role", f"{param}.role must be user, system, developer or assistant")
            messages.append({"role": role, "content": _text(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", param), "type": "function",
                    "function": {"name": _string(item, "name", param),
                                 "arguments": _string(item, "arguments", param)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", param),
                             "content": _text(output, f"{param}.output")})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(param, f"item_reference input items are not supported: {_STATELESS}", "unsupported_parameter")
        else:
            raise _bad(f"{param}.type", f"input item type {kind!r} is not supported (message, function_call, "
                       "function_call_output)", "unsupported_parameter")
    if not messages:
        raise _bad("input", "input must hold at least one message")
    return messages


def chat_tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    """Function ``tools`` in the chat form.

    Raises:
        APIError: 400 naming ``tools[i]`` for another tool type or a function without a name.
    """
    if body.tools is None:
        return None
    out = []
    for i, tool in enumerate(body.tools):
        if tool.get("type") != "function":
            raise _bad(f"tools[{i}]", f"tool type {tool.get('type')!r} is not supported (function tools only)",
                       "unsupported_parameter")
        fn = {"name": _string(tool, "name", f"tools[{i}]")}
        for key in ("description", "parameters"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(body: ResponsesRequest) -> str | dict[str, Any] | None:
    """``tool_choice`` in the chat form.

    Raises:
        APIError: 400 for a form other than none/auto/required or a named function.
    """
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("tool_choice", "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
               "unsupported_parameter")


def response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None for plain text).

    Raises:
        APIError: 400 naming ``text.format`` for another format or a json_schema without a schema.
    """
    fmt = (body.text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("text.format", "text.format type must be text, json_object or json_schema",
                   "unsupported_parameter")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if not isinstance(fmt.get("schema"), dict):
        raise _bad("text.format.schema", "text.format.schema is required for type json_schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "response", "schema": fmt["schema"]}}


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request ``body`` means (see the module docstring).

    Raises:
        APIError: 400 naming the field of ``body`` that cannot be served.
    """
    check_stateless(body)
    chat = body.model_dump(mode="json", include=set(_SamplingFields.model_fields), exclude_none=True)
    chat.update(messages=chat_messages(body), stream=False, n=1)
    chat.pop("stream_options", None)
    optional = {"tools": chat_tools(body), "tool_choice": chat_tool_choice(body),
                "parallel_tool_calls": body.parallel_tool_calls, "max_completion_tokens": body.max_output_tokens}
    rf = response_format(body)
    if rf is not None:
        if body.response_format is not None:
            raise _bad("text.format", "give text.format or response_format, not both")
        optional["response_format"] = rf
    chat.update({k: v for k, v in optional.items() if v is not None})
    try:
        return ChatCompletionRequest.model_validate_json(json.dumps(chat))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise _bad("input", f"input cannot be served as a conversation: {where}: {first['msg']}") from None
