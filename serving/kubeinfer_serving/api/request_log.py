"""One log line per HTTP request, at info level, when its response ends (errors included).

Fields: ``request_id`` (the ``X-Request-Id``), ``tenant``, ``model``, ``method``, ``route`` (the
route template, as the metrics label it; the path for a request no route took), ``status``, ``prompt_tokens``, ``output_tokens``,
``ttft_s`` (arrival to the first output, generation requests only) and ``total_s`` (arrival
to the end of the response body). In the text format they follow ``request`` as ``key=value``;
with ``--log-format json`` they are keys of the JSON object (:mod:`kubeinfer_serving.logs`).
Probes and scrapes (:data:`QUIET_PATHS`) are logged at debug level, so kubelet and Prometheus
do not fill the log.

The serving path fills the request's :class:`RequestRecord` through :func:`note` (the model)
and :func:`note_usage` (the token counts and the first output).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kubeinfer_serving.api.auth import identity_of
from kubeinfer_serving.asgi_status import StatusRecorder

log = logging.getLogger("kubeinfer_serving.requests")

#: Paths logged at debug level only (probes, scrapes, the router's load polls).
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/kubeinfer/load"})
_KEY = "request_log"


@dataclass
class RequestRecord:
    """What the log line of one request says beyond the HTTP layer.

    Attributes:
        start: ``time.perf_counter()`` at arrival, seconds.
        model: the model asked for (None: the route names none).
        usage: a callable giving ``(prompt_tokens, output_tokens)`` when the line is written.
        first_output: ``perf_counter()`` of the first output of the engine (None: none yet).
    """

    start: float
    model: str | None = None
    usage: Any = None
    first_output: float | None = None


def record_of(scope: dict[str, Any]) -> RequestRecord | None:
    """The record of the request ``scope`` belongs to (None outside :class:`RequestLogMiddleware`)."""
    return scope.get("state", {}).get(_KEY)


def note(scope: dict[str, Any], *, model: str | None = None, first_output: bool = False) -> None:
    """Record the request's model and/or that its first output arrived now."""
    record = record_of(scope)
    if record is None:
        return
    if model is not None:
        record.model = model
    if first_output and record.first_output is None:
        record.first_output = time.perf_counter()


def note_usage(scope: dict[str, Any], usage: Any) -> None:  # noqa: ANN401
    """Attach the request's usage counter (anything with ``usage()`` -> an object with
    ``prompt_tokens`` and ``completion_tokens``), read when the line is written."""
    record = record_of(scope)
    if record is not None:
        record.usage = usage


def _fields(scope: dict[str, Any], record: RequestRecord, status: int, request_id: str) -> dict[str, Any]:
    end = time.perf_counter()
    route = getattr(scope.get("route"), "path", None) or scope.get("path")  # unrouted (401, 404): the path
    prompt = output = None
    if record.usage is not None:
        u = record.usage.usage()
        prompt, output = u.prompt_tokens, u.completion_tokens
    ttft = None if record.first_output is None else round(record.first_output - record.start, 6)
    return {"request_id": request_id, "tenant": identity_of(scope).tenant.name, "model": record.model,
            "method": scope.get("method"), "route": route, "status": status, "prompt_tokens": prompt,
            "output_tokens": output, "ttft_s": ttft, "total_s": round(end - record.start, 6)}


class RequestLogMiddleware:
    """Pure ASGI middleware writing the request log line (see the module docstring).

    Installed inside the request-id middleware (which puts the id in ``scope["state"]["request_id"]``)
    and outside authentication and the body limit (their 401/413 are logged too).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(time.perf_counter())
        scope.setdefault("state", {})[_KEY] = record
        recorder = StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        finally:
            fields = _fields(scope, record, recorder.status, scope["state"].get("request_id", "-"))
            level = logging.DEBUG if scope.get("path") in QUIET_PATHS else logging.INFO
            if log.isEnabledFor(level):
                text = " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
                log.log(level, "request %s", text, extra={"fields": fields})
