"""Turning request prompts into token ids, and checking them against the model's context length.

Completions take a string, a list of strings, a token-id list or a list of token-id lists
(OpenAI's four ``prompt`` forms). Chat prompts are rendered with the model's own chat template
(``tokenizer.apply_chat_template(...)``), as Hugging Face and vLLM do, with the request's
``tools``, ``add_generation_prompt`` / ``continue_final_message`` and ``chat_template_kwargs``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.schemas import ChatMessage


def split_inputs(raw: str | list[str] | list[int] | list[list[int]], param: str) -> list[str] | list[list[int]]:
    """One of OpenAI's four input forms (``prompt`` of completions, ``input`` of embeddings) as a list.

    Args:
        raw: a string, a list of strings, a token-id list, or a list of token-id lists.
        param: the request field's name, used in the error.

    Returns:
        one string or token-id list per item, in request order (a lone token-id list is one item).

    Raises:
        APIError: 400 when the list is empty.
    """
    if isinstance(raw, str):
        return [raw]
    if len(raw) == 0:
        raise APIError(400, f"{param} must not be empty", param=param)
    if isinstance(raw[0], int):
        return [list(raw)]
    return list(raw)


def completion_prompts(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt of a completion request.

    Args:
        tokenizer: a Hugging Face tokenizer (special tokens such as BOS are added as the model expects).
        prompt: one of OpenAI's four forms.

    Returns:
        one list of token ids (int) per prompt, in request order.

    Raises:
        APIError: 400 when the list of prompts is empty, a prompt has no tokens, or a token id is
            outside the vocabulary.
    """
    texts_or_ids = split_inputs(prompt, "prompt")
    vocab = len(tokenizer)
    out: list[list[int]] = []
    for p in texts_or_ids:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt")
        out.append(ids)
    return out


def _message_text(msg: ChatMessage) -> str:
    """The text of a message: the string, or its text parts joined (non-text parts are rejected)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"content part type {part.type!r} is not supported (text only)", param="messages")
        texts.append(part.text)
    return "".join(texts)


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """One message as chat templates expect it (``developer`` as ``system``; tool-call arguments as objects)."""
    msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
    if m.name is not None:
        msg["name"] = m.name
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            fn = dict(call.get("function") or {})
            args = fn.get("arguments")
            if isinstance(args, str):  # OpenAI sends a JSON string; templates (Llama 3's) render an object
                try:
                    fn["arguments"] = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append({**call, "function": fn})
        msg["tool_calls"] = calls
    return msg


def chat_prompt(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a chat conversation rendered by the model's chat template.

    ``developer`` messages are passed as ``system`` (OpenAI renamed the role; templates know
    ``system``); assistant ``tool_calls`` and ``tool`` messages (with ``tool_call_id``) reach
    the template, as do ``tools``.

    Args:
        add_generation_prompt: end with the assistant turn's header (the usual case).
        continue_final_message: leave the last message open so the model continues it
            (a "prefill"); exclusive with ``add_generation_prompt``.
        chat_template_kwargs: extra variables for the template (e.g. ``enable_thinking``).

    Raises:
        APIError: 400 when the model has no chat template, the template rejects the conversation
            (e.g. roles out of order), or a content part is not text.
    """
    conv = [_template_message(m) for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "This model has no chat template; use /v1/completions", param="messages")
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("conversation", "tools", "add_generation_prompt", "continue_final_message", "tokenize"):
        if reserved in kwargs:
            raise APIError(400, f"chat_template_kwargs must not set {reserved!r}", param="chat_template_kwargs",
                           code="invalid_value")
    try:
        rendered = tokenizer.apply_chat_template(conv, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message, tokenize=True,
                                                 **kwargs)
    except Exception as exc:  # jinja2 TemplateError and raise_exception() in templates
        raise APIError(400, f"The chat template rejected the messages: {exc}", param="messages") from exc
    # transformers 5 returns a BatchEncoding (a Mapping) here; 4.x returned the id list itself.
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    ids = list(rendered)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, *, param: str) -> int:
    """The output budget of one prompt, checked against the context length.

    Args:
        requested: ``max_tokens`` from the request, or None for "fill the remaining context".
        num_prompt_tokens: prompt length in tokens.
        max_model_len: the model's context length in tokens (prompt + output).
        param: the request field named in the error (``prompt`` or ``messages``).

    Returns:
        max output tokens (>= 1).

    Raises:
        APIError: 400 ``context_length_exceeded`` when prompt + max_tokens exceeds ``max_model_len``
            (or the prompt alone leaves no room); the message names both numbers, as OpenAI's does.
    """
    if requested is None:
        if num_prompt_tokens >= max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                f"{num_prompt_tokens} tokens, leaving no room for the completion. Please reduce the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    return requested
