"""The one place that checks a request against the model it is for: vLLM's input processor.

:class:`RequestValidator` holds one model's limits and applies the rules; the context-length rules
are also functions of the context length alone (for the API's checks before tokenizing, and
for embedding models' ``/tokenize``). Each rule has its one message:

* context length: a text that cannot fit whatever its tokens, a prompt alone longer than the
  context, prompt + ``max_tokens`` beyond it, and the output budget of a request that leaves
  ``max_tokens`` out (the rest of the context, as vLLM);
* vocabulary: prompt token ids and the token ids of the sampling parameters (``logit_bias``,
  ``allowed_token_ids``, ``bad_words``, ``stop_token_ids``) must be ids of the model;
* priority policy: a non-zero ``priority`` needs the ``priority`` scheduling policy;
* queue cap: at most ``max_waiting_requests`` waiting beyond the running batch.

The API applies these rules before a request is admitted, naming the request's own fields;
the engine applies the same validator when a request is submitted (its guard for callers of
the engine itself). Every error is an :class:`~kubeinfer_serving.engine.errors.InvalidRequestError`
carrying the field it names (HTTP 400), or a ``QueueFullError`` (HTTP 429).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ContextLengthError, InvalidRequestError, PromptTooLongError, QueueFullError
from .sampling import SamplingParams

#: ``retry_after`` of :class:`QueueFullError`, seconds.
QUEUE_RETRY_AFTER = 1.0


def check_text_fits(max_model_len: int, num_chars: int, max_token_chars: int, *, param: str = "prompt") -> None:
    """Refuse a text that cannot fit the context whatever its tokens, before it is tokenized.

    Args:
        max_model_len: the context length, tokens.
        num_chars: the text's length in characters.
        max_token_chars: the most characters one token stands for (the tokenizer's longest entry + 1).
        param: the request field named in the error.

    Raises:
        ContextLengthError: ``num_chars > max_model_len * max_token_chars``.
    """
    if num_chars > max_model_len * max_token_chars:
        raise ContextLengthError(max_model_len, f"your {param} has {num_chars} characters, more than "
                                 f"{max_model_len} tokens can hold", f"the {param}", param=param)


def check_prompt_length(max_model_len: int, num_prompt_tokens: int, *, param: str = "prompt") -> None:
    """Refuse a prompt that alone is longer than the context (before the rest of the request is prepared).

    Raises:
        ContextLengthError: ``num_prompt_tokens > max_model_len``.
    """
    if num_prompt_tokens > max_model_len:
        raise ContextLengthError(max_model_len, f"your prompt has {num_prompt_tokens} tokens", "the prompt",
                                 param=param)


def check_context(max_model_len: int, num_prompt_tokens: int, max_tokens: int, *, param: str = "prompt") -> None:
    """Refuse prompt + ``max_tokens`` beyond the context length.

    Raises:
        PromptTooLongError: ``num_prompt_tokens + max_tokens > max_model_len`` (names both numbers).
    """
    if num_prompt_tokens + max_tokens > max_model_len:
        raise PromptTooLongError(max_model_len, num_prompt_tokens, max_tokens, param=param)


def output_budget(max_model_len: int, requested: int | None, num_prompt_tokens: int, *, param: str = "prompt") -> int:
    """The output budget of one prompt: ``requested``, or without it the rest of the context (as vLLM).

    Args:
        max_model_len: the context length, tokens.
        requested: ``max_tokens`` of the request, or None.
        num_prompt_tokens: the prompt's length in tokens.
        param: the request field named in the error (``prompt``, ``messages``, ``input``).

    Returns:
        max output tokens (>= 1 unless ``requested`` is 0, a prompt-scoring request).

    Raises:
        ContextLengthError: the prompt leaves no room, or prompt + ``requested`` exceeds the context.
    """
    if requested is None:
        if num_prompt_tokens >= max_model_len:
            raise ContextLengthError(max_model_len, f"your prompt has {num_prompt_tokens} tokens, leaving no room "
                                     "for the completion", "the prompt", param=param)
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_model_len:  # check_context's rule, without a second call
        raise PromptTooLongError(max_model_len, num_prompt_tokens, requested, param=param)
    return requested


def outside_vocabulary(token_id: int, vocab_size: int) -> str:
    """The one message of a token id outside a vocabulary of ``vocab_size`` ids (``[0, vocab_size)``)."""
    return f"token id {token_id} is outside the vocabulary (ids in [0, {vocab_size}))"


def queue_full(model_name: str) -> QueueFullError:
    """The one error of a full queue for ``model_name`` (the engine's or the fair-admission gate's)."""
    return QueueFullError(f"too many requests waiting for {model_name!r}; retry later", retry_after=QUEUE_RETRY_AFTER)


@dataclass(frozen=True)
class RequestValidator:
    """The limits of one model and the rules a request must pass to run on it.

    Attributes:
        model_name: the model's name (in messages).
        max_model_len: context length in tokens (prompt + output).
        vocab_size: token ids a prompt or a sampling parameter may use are in ``[0, vocab_size)``
            (the model's embedding rows, bounded by its tokenizer's size when it has one).
        scheduling_policy: ``fcfs`` or ``priority``.
        max_waiting_requests: requests allowed to wait beyond the running batch.
        has_tokenizer: False for an engine without a tokenizer (stop strings cannot work).
    """

    model_name: str
    max_model_len: int
    vocab_size: int
    scheduling_policy: str = "fcfs"
    max_waiting_requests: int = 2**31 - 1
    has_tokenizer: bool = True

    # ------------------------------------------------------------------ vocabulary
    def check_prompt_tokens(self, prompt_token_ids: list[int], *, param: str = "prompt") -> None:
        """Refuse an empty prompt or one with token ids outside the vocabulary.

        Raises:
            InvalidRequestError: naming ``param``.
        """
        if not prompt_token_ids:
            raise InvalidRequestError(f"{param} must contain at least one token", param=param)
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(self._outside_vocabulary(bad), param=param)

    def _outside_vocabulary(self, token_id: int) -> str:
        return outside_vocabulary(token_id, self.vocab_size)

    # ------------------------------------------------------------------ priority policy
    def check_priority(self, priority: int) -> None:
        """Refuse a non-zero ``priority`` unless the model schedules by priority (vLLM's rule).

        Raises:
            InvalidRequestError: ``param=priority``, ``unsupported_parameter``.
        """
        if priority != 0 and self.scheduling_policy != "priority":
            raise InvalidRequestError(f"priority needs the priority scheduling policy; model {self.model_name!r} "
                                      "schedules first come, first served", param="priority",
                                      code="unsupported_parameter")

    # ------------------------------------------------------------------ queue cap
    def check_queue(self, waiting: int, joining: int = 1) -> None:
        """Refuse ``joining`` more requests when ``waiting`` already wait and the cap would be passed.

        Raises:
            QueueFullError: ``waiting + joining > max_waiting_requests`` (``retry_after`` 1 s).
        """
        if waiting + joining > self.max_waiting_requests:
            raise queue_full(self.model_name)

    # ------------------------------------------------------------------ the whole request
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, *, param: str = "prompt") -> None:
        """Every rule but the queue cap, for one engine request.

        Raises:
            InvalidRequestError: an empty prompt, token ids outside the vocabulary (prompt or
                sampling parameters), stop strings without a tokenizer, a priority the policy
                does not allow; ``PromptTooLongError`` (a subclass) beyond the context.
        """
        self.check_prompt_tokens(prompt_token_ids, param=param)
        if params.max_token_id() >= self.vocab_size:
            for field, ids in (("logit_bias", list(params.logit_bias)), ("allowed_token_ids",
                               list(params.allowed_token_ids or [])), ("stop_token_ids", list(params.stop_token_ids)),
                               ("bad_words", [t for w in params.bad_words_token_ids for t in w])):
                bad = next((t for t in ids if t >= self.vocab_size), None)
                if bad is not None:
                    raise InvalidRequestError(self._outside_vocabulary(bad), param=field)
        check_context(self.max_model_len, len(prompt_token_ids), params.max_tokens, param=param)
        if params.stop and not self.has_tokenizer:
            raise InvalidRequestError("stop strings need a tokenizer; this engine has none", param="stop")
        self.check_priority(params.priority)
