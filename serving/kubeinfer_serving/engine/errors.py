"""Errors the engine raises to its callers (the API maps them to HTTP statuses)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every engine error."""


class QueueFullError(EngineError):
    """The waiting queue holds ``max_waiting_requests`` already (the API answers HTTP 429).

    Attributes:
        retry_after: suggested wait before retrying, in seconds.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(EngineError):
    """The engine loop has stopped (shut down or crashed); no request can be served (HTTP 503)."""


def context_length_message(max_model_len: int, detail: str, remedy: str) -> str:
    """The one wording (OpenAI's) of every context-length error: ``This model's maximum context
    length is N tokens. However, <detail>. Please reduce <remedy>.``"""
    return f"This model's maximum context length is {max_model_len} tokens. However, {detail}. Please reduce {remedy}."


class InvalidRequestError(EngineError, ValueError):
    """A request the model can never serve as asked (HTTP 400 naming ``param``).

    Raised by :class:`~kubeinfer_serving.engine.validation.RequestValidator`, the one place that
    checks a request against the model.

    Attributes:
        param: the request field at fault (OpenAI's error ``param``), or None.
        code: OpenAI's error ``code``.
    """

    def __init__(self, message: str, *, param: str | None = "prompt", code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthError(InvalidRequestError):
    """The request does not fit the model's context length (HTTP 400 ``context_length_exceeded``),
    in the one wording of :func:`context_length_message`."""

    def __init__(self, max_model_len: int, detail: str, remedy: str, *, param: str | None = "prompt") -> None:
        super().__init__(context_length_message(max_model_len, detail, remedy), param=param,
                         code="context_length_exceeded")
        self.max_model_len = max_model_len


class PromptTooLongError(ContextLengthError):
    """Prompt tokens + ``max_tokens`` exceed the model's context length (HTTP 400).

    The message follows OpenAI's wording and names both numbers.
    """

    def __init__(self, max_model_len: int, num_prompt_tokens: int, max_tokens: int, *,
                 param: str | None = "prompt") -> None:
        super().__init__(max_model_len, f"you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} "
                         f"in the prompt, {max_tokens} for the completion)", "the length of the prompt or completion",
                         param=param)
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens


class RequestFailedError(EngineError):
    """The engine failed this one request (an exception while preparing, running or sampling it).

    The request was aborted and its KV blocks freed; the engine and the other requests go on
    (HTTP 500 with code ``request_failed``; the message never carries internal details).
    """
