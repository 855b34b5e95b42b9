"""OpenAI-format errors: one exception type for the routes and the handlers that render every failure.

Every error the API returns has OpenAI's body ``{"error": {"message", "type", "param", "code"}}``
(https://platform.openai.com/docs/guides/error-codes) so the official clients raise their typed
exceptions (``BadRequestError`` for 400, ``NotFoundError`` for 404, ``RateLimitError`` for 429, ...).
FastAPI answers validation failures with 422 and its own body; OpenAI answers them with 400, so the
validation handler is replaced here.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubeinfer_serving.engine.errors import EngineDeadError, PromptTooLongError, QueueFullError
from kubeinfer_serving.registry.protocol import ModelError

log = logging.getLogger(__name__)

#: OpenAI's ``error.type`` for each HTTP status the API uses.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered with OpenAI's error body.

    Attributes:
        status: HTTP status code (400, 404, 413, 429, 500, 503).
        message: human-readable reason, returned as ``error.message``.
        param: the request field at fault (``"max_tokens"``, ``"messages"``), or None.
        code: machine-readable code (``"model_not_found"``, ``"context_length_exceeded"``), or None.
        retry_after: seconds a client should wait before retrying; sent as the ``Retry-After`` header.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for ``status``: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def to_api_error(exc: BaseException) -> APIError:
    """Translate an engine or registry exception into the :class:`APIError` the client sees.

    ``ModelError`` keeps its own status/code/retry_after; ``QueueFullError`` becomes 429 with
    ``Retry-After``; ``PromptTooLongError`` 400 ``context_length_exceeded``; ``EngineDeadError`` 503;
    anything else 500 (logged with its traceback).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelError):
        return APIError(exc.status, exc.message, param="model", code=exc.code, retry_after=exc.retry_after)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", retry_after=getattr(exc, "retry_after", None) or 1.0)
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine stopped: {exc}", code="engine_dead")
    log.error("unhandled error", exc_info=exc)
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", code="internal_error")


def error_response(err: APIError) -> JSONResponse:
    """The JSON response for ``err``, with ``Retry-After`` (whole seconds, rounded up) when set."""
    headers = None
    if err.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
    return JSONResponse(
        error_body(err.status, err.message, param=err.param, code=err.code), status_code=err.status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line per pydantic error (``field: reason``) and the first offending field name."""
    parts: list[str] = []
    param: str | None = None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        if e.get("type") == "json_invalid":
            parts.append(f"Invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "missing" and not field:
            parts.append("The request body is missing")
        else:
            parts.append(f"{field or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "Invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path of ``app`` answer in OpenAI's format.

    - ``RequestValidationError`` (malformed JSON, wrong types, out-of-range values): 400 instead of 422.
    - ``HTTPException`` (unknown route 404, wrong method 405): OpenAI body with the same status.
    - ``APIError``, ``ModelError`` and engine errors: :func:`to_api_error`.
    - anything else: 500 with the exception's class in the message.
    """

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        resp = error_response(APIError(exc.status_code, str(exc.detail)))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    for cls in (ModelError, QueueFullError, PromptTooLongError, EngineDeadError, Exception):

        @app.exception_handler(cls)
        async def _other(_: Request, exc: Exception) -> JSONResponse:
            return error_response(to_api_error(exc))
