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
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubeinfer_serving.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from kubeinfer_serving.registry.protocol import ModelError

log = logging.getLogger(__name__)

#: OpenAI's ``error.type`` for each HTTP status the API uses.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    408: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the response was ready."""


#: Status logged (never sent) when the client left before the response: nginx's "client closed request".
CLIENT_CLOSED = 499


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


#: Longest ``error.message`` sent (characters); longer ones are cut, so no request can make the
#: server echo megabytes back.
MAX_MESSAGE_CHARS = 1024
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+([\w.@+-]*)")


def redact(message: str) -> str:
    """``message`` safe to show a client: absolute paths cut to their last part, at most 1024 characters."""
    message = _ABS_PATH.sub(lambda m: m.group(1) or "<dir>", message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return message


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for ``status``: ``{"error": {"message", "type", "param", "code"}}``.

    The message goes through :func:`redact` (no filesystem paths, bounded length).
    """
    return {
        "error": {
            "message": redact(message),
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def to_api_error(exc: BaseException) -> APIError:
    """Translate an engine or registry exception into the :class:`APIError` the client sees.

    ``ModelError`` keeps its own status/code/retry_after; ``ClientDisconnected`` becomes 499 (never
    sent: the client is gone); ``QueueFullError`` becomes 429 with
    ``Retry-After``; ``InvalidRequestError`` (the model's request rules, :mod:`~kubeinfer_serving.engine.validation`)
    400 naming its field (``context_length_exceeded`` for the context length); ``EngineDeadError`` 503;
    anything else 500 (logged with its traceback).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnected):  # nobody reads the answer; nothing to log
        return APIError(CLIENT_CLOSED, "The client closed the request", code="client_closed")
    if isinstance(exc, ModelError):
        return APIError(exc.status, exc.message, param="model", code=exc.code, retry_after=exc.retry_after)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", retry_after=getattr(exc, "retry_after", None) or 1.0)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The model's engine stopped; the server is restarting it", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), code="request_failed")
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "The server had an error while processing your request", code="internal_error")


def error_response(err: APIError) -> JSONResponse:
    """The JSON response for ``err``, with ``Retry-After`` (whole seconds, rounded up) when set."""
    headers = None
    if err.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
    return JSONResponse(
        error_body(err.status, err.message, param=err.param, code=err.code), status_code=err.status, headers=headers
    )


#: Most pydantic errors listed in one message.
_MAX_VALIDATION_ERRORS = 5


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """The message (one ``field: reason`` per pydantic error), the first offending field and the code.

    Codes: ``invalid_json`` (syntax; ``param`` None, not the character offset pydantic reports),
    ``missing_required_parameter``, ``invalid_type`` (wrong JSON type) or ``invalid_value``.
    Messages never quote the input back.
    """
    parts: list[str] = []
    param: str | None = None
    code: str | None = None
    errors = exc.errors()
    for e in errors[:_MAX_VALIDATION_ERRORS]:
        kind = str(e.get("type", ""))
        if kind == "json_invalid":
            return f"Invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None, "invalid_json"
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not isinstance(x, int)]
        field = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if param is None and loc:
            param = loc[0]
        if code is None:
            if kind == "missing":
                code = "missing_required_parameter"
            elif kind.endswith("_type") or kind.endswith("_parsing") or kind == "model_attributes_type":
                code = "invalid_type"
            else:
                code = "invalid_value"
        if kind == "missing" and not field:
            parts.append("The request body is missing")
        else:
            parts.append(f"{field or 'body'}: {e.get('msg')}")
    if len(errors) > _MAX_VALIDATION_ERRORS:
        parts.append(f"and {len(errors) - _MAX_VALIDATION_ERRORS} more errors")
    return "; ".join(parts) or "Invalid request", param, code or "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path of ``app`` answer in OpenAI's format.

    - ``RequestValidationError`` (malformed JSON, wrong types, out-of-range values): 400 instead of 422.
    - ``HTTPException`` (unknown route 404, wrong method 405): OpenAI body with the same status.
    - ``APIError``, ``ModelError`` and engine errors: :func:`to_api_error`.
    - anything else: 500 ``internal_error`` (logged with its traceback; the client sees no details).
    """

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        resp = error_response(APIError(exc.status_code, str(exc.detail)))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    for cls in (ModelError, QueueFullError, InvalidRequestError, EngineDeadError, RequestFailedError,
                ClientDisconnected, Exception):

        @app.exception_handler(cls)
        async def _other(_: Request, exc: Exception) -> JSONResponse:
            return error_response(to_api_error(exc))
