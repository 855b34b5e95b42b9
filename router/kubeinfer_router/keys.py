"""What a request is routed by: its model, adapter and an affinity string (session or prompt prefix).

The affinity follows KubeAI's ``PrefixHash`` balancer (``internal/apiutils/request.go`` in
substratusai/kubeai): the first ``prefix_chars`` characters (100 by default) of the prompt. KubeAI
takes a chat's first user message; we take the messages' texts in order (system and developer
messages included, each followed by a newline) up to ``prefix_chars``, because that is the start of
the rendered prompt and so of the token prefix the pods' prefix caches share: requests with one long
system prompt land together, and every later turn of a conversation still carries its first turn's
key (earlier messages never change). A session key replaces the prompt when the client names one: the
``x-session-id`` header, else the body's ``user`` field (OpenAI's end-user id).

Prompt by API: ``prompt`` (completions; string, list of strings, token ids or lists of token ids: the
first one), ``messages`` (chat: the messages' texts in order), ``input`` (responses: a string, or a
list of input items read like chat messages after ``instructions``; embeddings: as completions'
``prompt``).
Token ids are written as decimal numbers joined by ``,`` before taking the first characters.
Characters are Unicode code points, not bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX_CHARS = 100
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True)
class RoutingKey:
    """What the picker hashes and filters by.

    Attributes:
        model: ``body["model"]`` (a base model or an adapter id), or None when the body has none.
        adapter: the LoRA adapter id, or None (adapters are requested by their own model id, so this
            stays None until the router learns adapters apart from base models).
        affinity: the session key, else the prompt's first ``prefix_chars`` characters; "" when none.
    """

    model: str | None
    adapter: str | None
    affinity: str


def routing_key(body: Any, headers: Mapping[str, str] | None = None,
                prefix_chars: int = DEFAULT_PREFIX_CHARS) -> RoutingKey:
    """The routing key of one request.

    Args:
        body: the parsed JSON body (anything: a non-dict, e.g. an unparseable body passed as None,
            gives ``RoutingKey(None, None, "")`` apart from a session header).
        headers: the request headers (matched case-insensitively), or None.
        prefix_chars: how many leading characters of the prompt make the affinity (>= 0).

    Returns:
        The :class:`RoutingKey`; never raises on odd field types (they count as absent).
    """
    session = _header(headers, SESSION_HEADER)
    if not isinstance(body, dict):
        return RoutingKey(model=None, adapter=None, affinity=session or "")
    model = body.get("model")
    model = model if isinstance(model, str) and model else None
    if not session:
        user = body.get("user")
        session = user if isinstance(user, str) else None
    prefix_chars = max(prefix_chars, 0)
    affinity = session if session else _prompt_text(body, prefix_chars)[:prefix_chars]
    return RoutingKey(model=model, adapter=None, affinity=affinity)


def request_priority(body: Any) -> int:
    """The request's ``priority`` field as an int (below 0: urgent), 0 when absent or not an integer."""
    value = body.get("priority") if isinstance(body, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    return value if isinstance(value, str) and value else None


def _prompt_text(body: dict, limit: int) -> str:
    """The prompt's text; at least its first ``limit`` characters when it has that many."""
    if "messages" in body:
        return _messages_text(body["messages"], limit)
    if "prompt" in body:
        return _prompt_form_text(body["prompt"], limit)
    value = body.get("input")
    if isinstance(value, list) and value and isinstance(value[0], dict):
        # responses API: instructions (the system message), then the input items like chat messages
        instructions = body.get("instructions")
        head = instructions + "\n" if isinstance(instructions, str) and instructions else ""
        return head + _messages_text(value, limit - len(head))
    return _prompt_form_text(value, limit)


def _prompt_form_text(value: Any, limit: int) -> str:
    """Text of OpenAI's four prompt forms: str, [str], [int], [[int]] (the first prompt of a batch)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        return ""
    first = value[0]
    if isinstance(first, str):
        return first
    if isinstance(first, list):
        return _token_text(first, limit)
    return _token_text(value, limit)


def _token_text(ids: list, limit: int) -> str:
    """Token ids as decimal numbers joined by ``,``; only the first ``limit`` ids (each is >= 1 char)."""
    return ",".join(str(i) for i in ids[:limit] if isinstance(i, int) and not isinstance(i, bool))


def _messages_text(messages: Any, limit: int) -> str:
    """The messages' texts in order, each followed by a newline, until at least ``limit`` characters."""
    if not isinstance(messages, list):
        return ""
    parts: list[str] = []
    size = 0
    for message in messages:
        if size >= limit:
            break
        if isinstance(message, dict):
            text = _content_text(message.get("content")) + "\n"
            parts.append(text)
            size += len(text)
    return "".join(parts)


def _content_text(content: Any) -> str:
    """A message's text: a string, or the ``text`` of its text parts joined (chat ``text``, responses
    ``input_text``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(part["text"] for part in content
                   if isinstance(part, dict) and isinstance(part.get("text"), str))
