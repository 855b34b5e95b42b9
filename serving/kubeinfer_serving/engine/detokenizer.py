"""Incremental detokenization with stop-string handling, one instance per request.

Decoding token by token breaks multi-byte characters and word-boundary spaces. With a fast
(Rust ``tokenizers``) tokenizer, ``tokenizers.decoders.DecodeStream`` does it: it holds tokens
back until they decode to whole characters and yields only the new text, seeded with the last
prompt tokens so SentencePiece leading spaces come out right (what vLLM's fast incremental
detokenizer uses). Other tokenizers decode a short window per step: the tokens since
``prefix_offset`` against those up to ``read_offset``, emitting the difference once it no longer
ends in an incomplete UTF-8 character (U+FFFD), the technique of Hugging Face
text-generation-inference that ``DecodeStream`` implements in Rust.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

#: Prompt tokens kept as leading context of the first decode window.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a request's output tokens into text deltas and finds stop strings.

    Args:
        tokenizer: a Hugging Face tokenizer, or None to produce no text (token-id-only use).
        prompt_token_ids: the prompt, for the first window's context.
        stop: stop strings; the text returned never contains them (unless
            ``include_stop_str``), and up to ``len(longest stop) - 1`` characters are held back
            until they cannot start one.
        include_stop_str: keep the stop string found at the end of the text.
        skip_special_tokens: leave special tokens out of the text.

    Attributes:
        text: output text so far (cut before a stop string once one is found).
        stopped: True once a stop string was found.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str], *,
                 include_stop_str: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.include_stop_str = include_stop_str
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        context = prompt_token_ids[-_PROMPT_CONTEXT:] if tokenizer is not None else []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if isinstance(backend, Tokenizer) else None
        self._stream = DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens) \
            if self._backend is not None else None
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""
        self._sent = 0
        self.stopped = False

    def add_tokens(self, token_ids: list[int]) -> None:
        """Append generated tokens, extend :attr:`text`, and cut it at a stop string if one appears."""
        if self.tokenizer is None or self.stopped:
            return
        old_len = len(self.text)
        if self._stream is not None:
            for tid in token_ids:
                piece = self._stream.step(self._backend, tid)
                if piece:
                    self.text += piece
            token_ids = []
        for tid in token_ids:
            self._ids.append(tid)
            skip = self.skip_special_tokens
            prefix = self.tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
            full = self.tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=skip)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix):]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
        if self.stop and len(self.text) > old_len:
            start = max(0, old_len - self.holdback)
            hits = [(i, i + len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
            if hits:
                begin, end = min(hits)
                self.text = self.text[: end if self.include_stop_str else begin]
                self.stopped = True

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, the last ``holdback`` characters stay back.

        Args:
            finished: the request ends with this output, so everything left is released.
        """
        end = len(self.text) if finished or self.stopped else max(self._sent, len(self.text) - self.holdback)
        delta = self.text[self._sent:end]
        self._sent = end
        return delta
