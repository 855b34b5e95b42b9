"""The spans of one HTTP request, when tracing is on (:mod:`kubeinfer_serving.tracing`).

Per request (probes and scrapes, :data:`~.request_log.QUIET_PATHS`, get none)::

    POST /v1/chat/completions        SERVER, continued from the request's ``traceparent``
    ├── admission                    tenant limits and fair admission (:func:`.serving.admit`)
    └── llm_request                  one per engine request (choice), vLLM's span name
        ├── queue                    engine arrival -> first scheduled
        ├── prefill                  first scheduled -> first token
        └── decode                   first token -> last token

The phases are child spans rather than span events: each has a duration, which a trace viewer
draws on the waterfall and a query can filter on; an event is one instant. Their times are the
engine's own per-request timestamps (:class:`~kubeinfer_serving.engine.outputs.RequestTimings`,
monotonic seconds), so the spans of the engine phases are written when the request ends, with
explicit start and end times; no clock is added.

Attributes follow OpenTelemetry's HTTP and GenAI semantic conventions where they have a name
(``http.request.method``, ``http.route``, ``http.response.status_code``, ``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.request.max_tokens``/``temperature``/``top_p``/``top_k``/
``seed``, ``gen_ai.usage.input_tokens``/``output_tokens``, ``gen_ai.response.finish_reasons``),
and vLLM's names for the latencies it reports on its ``llm_request`` span
(``gen_ai.request.id``, ``gen_ai.latency.time_in_queue``, ``gen_ai.latency.time_to_first_token``,
``gen_ai.latency.e2e``, seconds); ours are ``kubeinfer.request_id`` (the ``X-Request-Id``),
``kubeinfer.tenant`` and ``kubeinfer.choice_index``. No prompt or output text is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kubeinfer_serving.api.auth import identity_of
from kubeinfer_serving.api.request_log import QUIET_PATHS, record_of
from kubeinfer_serving.asgi_status import StatusRecorder
from kubeinfer_serving.engine.outputs import RequestOutput
from kubeinfer_serving.tracing import Tracing, monotonic_to_epoch_ns, set_attributes

_KEY = "trace_span"
_PROPAGATOR = TraceContextTextMapPropagator()
#: ``gen_ai.operation.name`` of the generation and embedding routes.
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/responses": "chat",
              "/v1/embeddings": "embeddings"}


def span_of(scope: Mapping[str, Any]) -> trace.Span | None:
    """The server span of the request ``scope`` belongs to (None: tracing off, or a quiet path)."""
    return scope.get("state", {}).get(_KEY)


def _tracer(scope: Mapping[str, Any]) -> trace.Tracer:
    return scope["state"][_KEY + ".tracer"]


@contextmanager
def phase(scope: Mapping[str, Any], name: str) -> Iterator[None]:
    """A child span ``name`` of the request's server span around the ``with`` body (nothing when tracing is off).

    An exception leaving the body is recorded on the span, which then has status ERROR.
    """
    parent = span_of(scope)
    if parent is None:
        yield
        return
    span = _tracer(scope).start_span(name, context=trace.set_span_in_context(parent))
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield


def engine_spans(scope: Mapping[str, Any], model: str, jobs: list[Any], outputs: Mapping[int, RequestOutput]) -> None:
    """Write the ``llm_request`` span of each finished engine request, with its queue/prefill/decode children.

    Args:
        model: the model's name.
        jobs: the request's :class:`~kubeinfer_serving.api.generation.Job` s.
        outputs: choice index -> the job's last output (``finished``; with ``timings``); jobs
            without one (aborted before they ended) get no span.
    """
    parent = span_of(scope)
    if parent is None:
        return
    tracer = _tracer(scope)
    epoch_ns = monotonic_to_epoch_ns()
    for job in jobs:
        out = outputs.get(job.index)
        t = None if out is None else out.timings
        if t is None:
            continue
        end = t.last_token if t.last_token is not None else t.first_token or t.first_scheduled or t.arrival
        span = tracer.start_span("llm_request", context=trace.set_span_in_context(parent),
                                 start_time=epoch_ns(t.arrival))
        p = job.params
        set_attributes(span, {
            "gen_ai.request.id": job.request_id, "gen_ai.request.model": model, "kubeinfer.choice_index": job.index,
            "gen_ai.request.max_tokens": p.max_tokens, "gen_ai.request.temperature": p.temperature,
            "gen_ai.request.top_p": p.top_p, "gen_ai.request.top_k": p.top_k if p.top_k > 0 else None,
            "gen_ai.request.seed": p.seed,
            "gen_ai.usage.input_tokens": out.num_prompt_tokens, "gen_ai.usage.output_tokens": out.num_output_tokens,
            "gen_ai.response.finish_reasons": [out.finish_reason or "abort"],
            "gen_ai.latency.time_in_queue": None if t.first_scheduled is None else t.first_scheduled - t.arrival,
            "gen_ai.latency.time_to_first_token": None if t.first_token is None else t.first_token - t.arrival,
            "gen_ai.latency.e2e": end - t.arrival,
        })
        if out.error:
            span.set_status(Status(StatusCode.ERROR, out.error))
        context = trace.set_span_in_context(span)
        for name, start, stop in (("queue", t.arrival, t.first_scheduled), ("prefill", t.first_scheduled, t.first_token),
                                  ("decode", t.first_token, t.last_token)):
            if start is not None and stop is not None:
                tracer.start_span(name, context=context, start_time=epoch_ns(start)).end(end_time=epoch_ns(stop))
        span.end(end_time=epoch_ns(end))


def _headers(scope: Mapping[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


class RequestTraceMiddleware:
    """Pure ASGI middleware: the server span of each HTTP request (see the module docstring).

    Installed inside :class:`~.request_log.RequestLogMiddleware` (whose record gives the model and
    the token counts) and outside authentication (a 401 is traced too).

    Args:
        app: the inner ASGI app.
        tracing: the app's tracer provider.
    """

    def __init__(self, app: Any, tracing: Tracing) -> None:  # noqa: ANN401
        self.app = app
        self.tracer = tracing.tracer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
        if scope["type"] != "http" or scope.get("path") in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        span = self.tracer.start_span(method, context=_PROPAGATOR.extract(_headers(scope)), kind=SpanKind.SERVER,
                                      attributes={"http.request.method": method, "url.path": scope.get("path", "")})
        state = scope.setdefault("state", {})
        state[_KEY], state[_KEY + ".tracer"] = span, self.tracer
        recorder = StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        except BaseException as exc:
            span.record_exception(exc)
            raise
        finally:
            self._finish(scope, span, method, recorder.status)

    @staticmethod
    def _finish(scope: dict[str, Any], span: trace.Span, method: str, status: int) -> None:
        route = getattr(scope.get("route"), "path", None)
        if route is not None:
            span.update_name(f"{method} {route}")
        attributes: dict[str, Any] = {"http.route": route, "http.response.status_code": status,
                                      "gen_ai.operation.name": OPERATIONS.get(route or ""),
                                      "kubeinfer.request_id": scope["state"].get("request_id"),
                                      "kubeinfer.tenant": identity_of(scope).tenant.name}
        record = record_of(scope)
        if record is not None:
            attributes["gen_ai.request.model"] = record.model
            if record.usage is not None:
                usage = record.usage.usage()
                attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
                attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        set_attributes(span, attributes)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        span.end()
