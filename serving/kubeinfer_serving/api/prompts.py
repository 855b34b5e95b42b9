"""Turning request prompts into token ids, and checking them against the model's context length.

Completions take a string, a list of strings, a token-id list or a list of token-id lists
(OpenAI's four ``prompt`` forms). Chat prompts are rendered with the model's own chat template
(``tokenizer.apply_chat_template(...)``), as Hugging Face and vLLM do, with the request's
``tools``, ``add_generation_prompt`` / ``continue_final_message`` and ``chat_template_kwargs``.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.schemas import ChatMessage
from kubeinfer_serving.engine import validation
from kubeinfer_serving.engine.validation import RequestValidator


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


_LOCKS_GUARD = threading.Lock()


def tokenizer_lock(tokenizer: Any) -> threading.Lock:
    """The lock serializing calls into ``tokenizer`` from worker threads (created once per tokenizer).

    Fast tokenizers keep per-call settings (``split_special_tokens``, truncation) in the shared
    Rust object, so two threads must not use one tokenizer at the same time.
    """
    lock = getattr(tokenizer, "_kubeinfer_lock", None)
    if lock is None:
        with _LOCKS_GUARD:
            lock = getattr(tokenizer, "_kubeinfer_lock", None)
            if lock is None:
                lock = threading.Lock()
                try:
                    tokenizer._kubeinfer_lock = lock
                except AttributeError:
                    pass
    return lock


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can stand for (cached on the tokenizer).

    A vocabulary entry's string is at least as long as the text it covers (byte-level BPE spells
    each byte as one character; SentencePiece spells it as is), so a text longer than
    ``max_model_len * max_token_chars`` cannot fit the context, whatever its tokens.
    """
    cached = getattr(tokenizer, "_kubeinfer_max_token_chars", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        cached = max((len(k) for k in vocab), default=1) + 1
        try:
            tokenizer._kubeinfer_max_token_chars = cached
        except AttributeError:  # a tokenizer that refuses attributes: compute every time
            pass
    return cached


def completion_prompts(
    tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]], validator: RequestValidator | None = None
) -> list[list[int]]:
    """Token ids of each prompt of a completion request.

    Blocking for long prompts: routes call it in a worker thread.

    Args:
        tokenizer: a Hugging Face tokenizer (special tokens such as BOS are added as the model expects).
        prompt: one of OpenAI's four forms.
        validator: the model's request rules; when given, a prompt that cannot fit the context is
            refused before it is tokenized (a token-id list longer than it, or a text longer
            than it can hold), and each prompt's token ids are checked against the vocabulary.

    Returns:
        one list of token ids (int) per prompt, in request order.

    Raises:
        APIError: 400 when the list of prompts is empty.
        InvalidRequestError: 400 naming ``prompt`` for a prompt without tokens or a token id outside
            the vocabulary; ``context_length_exceeded`` for a prompt that cannot fit.
    """
    texts_or_ids = split_inputs(prompt, "prompt")
    if validator is not None:
        for p in texts_or_ids:
            if isinstance(p, str):
                validation.check_text_fits(validator.max_model_len, len(p), max_token_chars(tokenizer))
            else:
                validation.check_prompt_length(validator.max_model_len, len(p))
    out: list[list[int]] = []
    for p in texts_or_ids:
        if isinstance(p, str):
            with tokenizer_lock(tokenizer):
                ids = tokenizer.encode(p)
        else:
            ids = list(p)
        if validator is not None:
            validator.check_prompt_tokens(ids)
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


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """The text forms of the tokenizer's special (control) tokens, e.g. ``<|eot_id|>`` (cached)."""
    cached = getattr(tokenizer, "_kubeinfer_special_strings", None)
    if cached is None:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        cached = tuple(sorted({t.content for t in decoder.values() if getattr(t, "special", False) and t.content}))
        try:
            tokenizer._kubeinfer_special_strings = cached
        except AttributeError:
            pass
    return cached


def _encode_rendered(tokenizer: Any, masked: str, rendered: str, contents: dict[str, str]) -> list[int]:
    """Tokenize a rendered conversation so that only the template's text can produce special tokens.

    The conversation was rendered twice: as is (``rendered``) and with each message content
    replaced by a unique random placeholder (``masked``; ``contents`` maps placeholder ->
    content). The placeholders mark exactly where the template's own text ends and a client's
    text begins, whatever the contents hold (a content that repeats the template's text cannot
    move the boundary, as searching for the contents in ``rendered`` could). The template's
    text is tokenized as usual, the contents with ``split_special_tokens=True`` (their
    control-token text becomes ordinary text tokens), as Hugging Face's guidance on untrusted
    chat input recommends. The pieces must put ``rendered`` back together, with the contents
    as given or stripped (templates that ``trim`` them).

    Raises:
        APIError: 400 when the template renders the contents otherwise (drops, repeats or
            rewrites one that holds control-token text): refused rather than parsed into control tokens.
    """
    refused = APIError(400, "A message contains the model's control-token text, which is not allowed",
                       param="messages", code="invalid_value")
    pieces: list[tuple[str, bool]] = []
    pos = 0
    seen: list[str] = []
    for m in re.finditer("|".join(map(re.escape, contents)), masked):
        pieces += [(masked[pos:m.start()], False), (contents[m.group()], True)]
        seen.append(m.group())
        pos = m.end()
    pieces.append((masked[pos:], False))
    if sorted(seen) != sorted(contents):
        raise refused
    for transform in (str, str.strip):
        candidate = [(transform(text) if is_content else text, is_content) for text, is_content in pieces]
        if "".join(text for text, _ in candidate) == rendered:
            break
    else:
        raise refused
    ids: list[int] = []
    for text, is_content in candidate:
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=is_content)["input_ids"]
    return ids


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
            fn = call.function.model_dump()
            args = fn["arguments"]
            if isinstance(args, str):  # OpenAI sends a JSON string; templates (Llama 3's) render an object
                try:
                    fn["arguments"] = json.loads(args)
                except json.JSONDecodeError:
                    pass
            calls.append({**call.model_dump(exclude_none=True), "function": fn})
        msg["tool_calls"] = calls
    return msg


def _refuse_control_text(specials: tuple[str, ...], messages: Sequence[ChatMessage],
                         tools: list[dict[str, Any]] | None, chat_template_kwargs: dict[str, Any] | None) -> None:
    """Refuse control-token text in the client strings a template renders besides message contents.

    Contents are tokenized so that such text stays text (:func:`_encode_rendered`); names, tool
    calls, ``tools`` and template variables cannot be located reliably in the rendered text
    (templates serialize them), so they are refused instead.

    Raises:
        APIError: 400 naming the field that holds control-token text.
    """
    parts: list[tuple[str, Any]] = [("tools", tools), ("chat_template_kwargs", chat_template_kwargs)]
    for i, m in enumerate(messages):
        parts += [(f"messages[{i}].name", m.name), (f"messages[{i}].tool_call_id", m.tool_call_id),
                  (f"messages[{i}].tool_calls", [c.model_dump() for c in m.tool_calls or []] or None)]
    for param, value in parts:
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if any(s in text for s in specials):
            raise APIError(400, "The request contains the model's control-token text, which is not allowed",
                           param=param, code="invalid_value")



def check_template_flags(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """Refuse both ``add_generation_prompt`` and ``continue_final_message`` (a new assistant turn and
    the last message left open exclude each other).

    Raises:
        APIError: 400 naming ``continue_final_message``.
    """
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false",
                       param="continue_final_message", code="invalid_value")


def chat_prompt(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    max_model_len: int | None = None,
    *,
    parse_special_tokens: bool = False,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    param: str = "messages",
) -> list[int]:
    """Token ids of a chat conversation rendered by the model's chat template.

    ``developer`` messages are passed as ``system`` (OpenAI renamed the role; templates know
    ``system``); assistant ``tool_calls`` and ``tool`` messages (with ``tool_call_id``) reach
    the template, as do ``tools``. Message contents can never produce the model's control tokens
    (``<|eot_id|>`` typed by a user stays text, so it cannot close its turn and forge a system
    turn), unless ``parse_special_tokens`` (the server's ``--parse-special-tokens-in-chat``
    opt-out); control-token text in the other client strings the template renders (names, tool
    calls, ``tools``, ``chat_template_kwargs``) is refused. Blocking: routes call it in a worker thread.

    Args:
        max_model_len: when given, a conversation whose text cannot fit the context is refused
            before rendering.
        add_generation_prompt: end with the assistant turn's header (the usual case).
        continue_final_message: leave the last message open so the model continues it
            (a "prefill"); exclusive with ``add_generation_prompt``.
        chat_template_kwargs: extra variables for the template (e.g. ``enable_thinking``).
        param: the request field named when the conversation cannot fit (``/v1/responses``: ``input``).

    Raises:
        APIError: 400 when the model has no chat template, the template rejects the conversation
            (e.g. roles out of order), or a content part is not text; 400 ``context_length_exceeded``
            when the text cannot fit.
    """
    conv = [_template_message(m) for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "This model has no chat template; use /v1/completions", param="messages")
    if max_model_len is not None:
        validation.check_text_fits(max_model_len, sum(len(m["content"]) for m in conv), max_token_chars(tokenizer),
                                   param=param)
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("conversation", "tools", "add_generation_prompt", "continue_final_message", "tokenize"):
        if reserved in kwargs:
            raise APIError(400, f"chat_template_kwargs must not set {reserved!r}", param="chat_template_kwargs",
                           code="invalid_value")
    specials = () if parse_special_tokens else special_token_strings(tokenizer)
    if specials:
        _refuse_control_text(specials, messages, tools, chat_template_kwargs)
    injected = any(s in m["content"] for m in conv for s in specials)
    with tokenizer_lock(tokenizer):

        def render(messages: list[dict[str, Any]], tokenize: bool) -> Any:
            try:
                return tokenizer.apply_chat_template(
                    messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message, tokenize=tokenize, **kwargs)
            except Exception as exc:  # jinja2 TemplateError and raise_exception() in templates
                raise APIError(400, f"The chat template rejected the messages: {exc}", param="messages") from exc

        rendered = render(conv, not injected)
        if injected:
            nonce = uuid.uuid4().hex
            mark = [f"kubeinfer{nonce}content{i}" if m["content"] else "" for i, m in enumerate(conv)]
            masked = render([{**m, "content": mark[i]} for i, m in enumerate(conv)], False)
            marks = {mark[i]: m["content"] for i, m in enumerate(conv) if m["content"]}
            return [int(t) for t in _encode_rendered(tokenizer, masked, rendered, marks)]
    # transformers 5 returns a BatchEncoding (a Mapping) here; 4.x returned the id list itself.
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    ids = list(rendered)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]
