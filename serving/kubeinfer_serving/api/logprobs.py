"""The ``logprobs`` objects of the responses, in OpenAI's two shapes, built from the engine's entries.

Token strings are each token decoded on its own (so a character split across byte-level
tokens shows as U+FFFD pieces, as in OpenAI's and vLLM's answers), or ``token_id:<id>`` with
vLLM's ``return_tokens_as_token_ids``. ``-inf`` (a banned token) is reported as -9999.0, as
vLLM does, since JSON has no infinity.
"""

from __future__ import annotations

import math
from typing import Any

from kubeinfer_serving.api.schemas import ChatLogprob, ChatLogprobs, ChatTopLogprob, CompletionLogprobs
from kubeinfer_serving.engine.outputs import TokenLogprob

#: What a log-probability of -inf is reported as.
FLOOR = -9999.0


def _value(x: float) -> float:
    return FLOOR if math.isnan(x) or x < FLOOR else float(x)


class TokenText:
    """Token id -> the string shown for it (memoised per response).

    Args:
        tokenizer: the Hugging Face tokenizer.
        as_ids: show ``token_id:<id>`` instead of the decoded text (vLLM's ``return_tokens_as_token_ids``).
    """

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._as_ids = as_ids
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = f"token_id:{token_id}" if self._as_ids else self._tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def chat_logprobs(entries: list[TokenLogprob], text: TokenText, top: int) -> ChatLogprobs:
    """``choices[i].logprobs`` of a chat completion (or chunk): one entry per output token.

    Args:
        entries: the engine's entries for the tokens covered.
        text: token strings.
        top: ``top_logprobs`` of the request (how many alternatives each entry lists).
    """
    content = []
    for e in entries:
        tok = text(e.token_id)
        alts = [ChatTopLogprob(token=text(t), logprob=_value(v), bytes=list(text(t).encode())) for t, v in e.top[:top]]
        content.append(ChatLogprob(token=tok, logprob=_value(e.logprob), bytes=list(tok.encode()), top_logprobs=alts))
    return ChatLogprobs(content=content)


def completion_logprobs(entries: list[TokenLogprob], text: TokenText, top: int, offset: int
                        ) -> tuple[CompletionLogprobs, int]:
    """``choices[i].logprobs`` of a legacy completion (or chunk).

    Args:
        entries: one per token.
        text: token strings.
        top: ``logprobs`` of the request; each ``top_logprobs`` dict holds that many
            alternatives plus the token itself (so up to ``top + 1`` keys, as OpenAI's).
        offset: character offset of the first token in the choice's text.

    Returns:
        (the object, the offset after its last token), for the next streamed chunk.
    """
    out = CompletionLogprobs()
    for e in entries:
        tok = text(e.token_id)
        alts = {text(t): _value(v) for t, v in e.top[:top]}
        alts.setdefault(tok, _value(e.logprob))
        out.tokens.append(tok)
        out.token_logprobs.append(_value(e.logprob))
        out.top_logprobs.append(alts)
        out.text_offset.append(offset)
        offset += len(tok)
    return out, offset


def prompt_completion_logprobs(prompt_ids: list[int], entries: list[TokenLogprob | None], text: TokenText,
                               top: int) -> tuple[CompletionLogprobs, int]:
    """The echoed prompt's part of a legacy completion's ``logprobs``: the first token has null values.

    Args:
        prompt_ids: the prompt's token ids.
        entries: the engine's prompt entries (``entries[0]`` is None).
        text, top: as for :func:`completion_logprobs`.

    Returns:
        (the object, the offset after the prompt).
    """
    first = text(prompt_ids[0])
    head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    rest, offset = completion_logprobs([e for e in entries[1:] if e is not None], text, top, len(first))
    return merge(head, rest), offset


def merge(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    """``a`` followed by ``b`` (both legacy ``logprobs`` objects)."""
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)
