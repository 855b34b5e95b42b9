"""OpenTelemetry traces of the serving pod: the tracer provider, on only when an OTLP endpoint is configured.

Where spans go: ``--otlp-traces-endpoint`` (vLLM's flag; ``KUBEINFER_OTLP_TRACES_ENDPOINT``), a
full OTLP/HTTP URL such as ``http://collector:4318/v1/traces``; else the standard variables the
OTLP exporter reads itself, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is) or
``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces`` appended). With none of them, tracing is off:
:func:`from_settings` returns None, no middleware is installed, and the SDK and exporter are not
even imported, so a request pays nothing.

The provider belongs to the app (never the process-global one), batches spans
(``BatchSpanProcessor``: the ``OTEL_BSP_*`` variables tune it) and posts them as protobuf over
HTTP (``OTLPSpanExporter``; ``OTEL_EXPORTER_OTLP_HEADERS`` etc. apply). The resource's
``service.name`` is ``OTEL_SERVICE_NAME``, else ``kubeinfer-serving``.

Which spans a request gets, and their attributes, is :mod:`kubeinfer_serving.api.request_trace`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace

#: The standard variables that turn tracing on without the flag (read by the OTLP exporter).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: ``service.name`` when ``OTEL_SERVICE_NAME`` does not say one.
SERVICE_NAME = "kubeinfer-serving"
#: The instrumentation scope of every span.
SCOPE = "kubeinfer_serving"


class Tracing:
    """The app's tracer provider: a ``BatchSpanProcessor`` over an ``OTLPSpanExporter`` (protobuf over HTTP).

    Args:
        endpoint: the OTLP/HTTP traces URL; None lets the exporter read the ``OTEL_EXPORTER_OTLP_*``
            variables (see the module docstring).
    """

    def __init__(self, endpoint: str | None) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME_KEY: SERVICE_NAME}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: trace.Tracer = self.provider.get_tracer(SCOPE)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export every ended span now (blocking up to ``timeout_s`` seconds); True when all were sent."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread (blocking; the app's lifespan calls it)."""
        self.provider.shutdown()


def endpoint_configured(endpoint: str | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether traces are on: ``endpoint`` (the flag) or one of :data:`ENDPOINT_VARIABLES` is non-empty."""
    env = os.environ if env is None else env
    return bool(endpoint) or any(env.get(name) for name in ENDPOINT_VARIABLES)


def from_settings(endpoint: str | None) -> Tracing | None:
    """The app's :class:`Tracing`, or None (tracing off) when no endpoint is configured (:func:`endpoint_configured`).

    Args:
        endpoint: ``ServerSettings.otlp_traces_endpoint`` (wins over the variables).
    """
    return Tracing(endpoint) if endpoint_configured(endpoint) else None


def monotonic_to_epoch_ns() -> Callable[[float], int]:
    """A converter of ``time.monotonic()`` readings (seconds; the engine's per-request timestamps) to
    Unix time in nanoseconds, the clock of OpenTelemetry spans. The offset between the clocks is
    taken once, now, so readings converted by one converter keep their exact order and gaps."""
    offset = time.time_ns() - time.monotonic_ns()
    return lambda monotonic_s: offset + int(monotonic_s * 1e9)


def set_attributes(span: Any, attributes: Mapping[str, Any]) -> None:  # noqa: ANN401
    """Set the attributes of ``span`` that are not None (OpenTelemetry refuses None values)."""
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(key, value)
