"""OpenTelemetry traces: exported over OTLP/HTTP to a real (in-process) collector, continuing the client's trace.

The collector is a tiny HTTP server in a thread that accepts ``POST /v1/traces`` and decodes the
protobuf bodies as ``ExportTraceServiceRequest``; the app is served by uvicorn and called with the
official ``openai`` client sending a W3C ``traceparent`` header.
"""

from __future__ import annotations

import gzip
import os
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.api.request_trace import RequestTraceMiddleware
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry
from kubeinfer_serving.tracing import ENDPOINT_VARIABLES
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.api.conftest import MAX_MODEL_LEN, MODEL, ServerThread


class Collector:
    """An OTLP/HTTP traces receiver on 127.0.0.1: every span of every ``POST /v1/traces``, decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, str]] = []
        self.paths: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    outer.paths.append(self.path)
                    for rs in request.resource_spans:
                        outer.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                        for ss in rs.scope_spans:
                            outer.spans.extend(ss.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def of_trace(self, trace_id: str) -> list[Span]:
        """The spans received so far of trace ``trace_id`` (32 hex digits)."""
        return [s for s in list(self.spans) if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def _attrs(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        out[a.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


def _traceparent() -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a fresh sampled W3C trace context."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _wait_spans(srv: ServerThread, collector: Collector, trace_id: str, count: int, timeout: float = 30.0) -> list[Span]:
    """The spans of ``trace_id`` once ``count`` arrived (flushing the app's exporter meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        srv.app.state.tracing.force_flush()
        spans = collector.of_trace(trace_id)
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def _app(settings: ServerSettings):  # noqa: ANN202
    catalogue = Catalogue(models=[ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True,
                                             max_model_len=MAX_MODEL_LEN)], max_num_seqs=4)
    return create_app(ModelRegistry(catalogue, device="cpu"), settings=settings)


def _serve(settings: ServerSettings) -> ServerThread:
    srv = ServerThread(_app(settings))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def traced(collector: Collector) -> Iterator[ServerThread]:
    """A server with ``--otlp-traces-endpoint`` pointing at the collector."""
    assert not any(os.environ.get(v) for v in ENDPOINT_VARIABLES)
    srv = _serve(ServerSettings(host="127.0.0.1", port=0, otlp_traces_endpoint=f"{collector.url}/v1/traces"))
    yield srv
    srv.stop()


def _by_name(spans: list[Span]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def test_a_chat_request_continues_the_callers_trace(traced: ServerThread, collector: Collector) -> None:
    header, trace_id, parent_id = _traceparent()
    client = openai.OpenAI(base_url=f"{traced.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"traceparent": header, "X-Request-Id": "trace-chat-1"})
    usage = reply.usage
    spans = _wait_spans(traced, collector, trace_id, 6)
    named = _by_name(spans)
    assert sorted(named) == ["POST /v1/chat/completions", "admission", "decode", "llm_request", "prefill", "queue"]
    assert all(len(v) == 1 for v in named.values())
    server = named["POST /v1/chat/completions"][0]
    assert server.parent_span_id.hex() == parent_id  # continued from the caller's span
    assert server.kind == Span.SpanKind.SPAN_KIND_SERVER
    attrs = _attrs(server)
    assert attrs["http.route"] == "/v1/chat/completions" and attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == MODEL
    assert attrs["kubeinfer.request_id"] == "trace-chat-1"
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens)

    llm = named["llm_request"][0]
    for child in ("admission", "llm_request"):
        assert named[child][0].parent_span_id == server.span_id
    for phase in ("queue", "prefill", "decode"):
        assert named[phase][0].parent_span_id == llm.span_id
    la = _attrs(llm)
    assert la["gen_ai.request.max_tokens"] == 4 and la["gen_ai.request.model"] == MODEL
    assert (la["gen_ai.usage.input_tokens"], la["gen_ai.usage.output_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens)
    assert la["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert 0 <= la["gen_ai.latency.time_in_queue"] <= la["gen_ai.latency.time_to_first_token"] <= la["gen_ai.latency.e2e"]
    # The phases tile the engine request, inside the HTTP request's span.
    queue, prefill, decode = (named[p][0] for p in ("queue", "prefill", "decode"))
    assert queue.start_time_unix_nano == llm.start_time_unix_nano and decode.end_time_unix_nano == llm.end_time_unix_nano
    assert queue.end_time_unix_nano == prefill.start_time_unix_nano
    assert prefill.end_time_unix_nano == decode.start_time_unix_nano
    assert server.start_time_unix_nano <= named["admission"][0].start_time_unix_nano <= llm.start_time_unix_nano
    assert llm.end_time_unix_nano <= server.end_time_unix_nano
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    assert {"service.name": "kubeinfer-serving"}.items() <= collector.resources[0].items()


def test_a_streamed_request_with_two_choices_gets_one_engine_span_each(traced: ServerThread,
                                                                       collector: Collector) -> None:
    header, trace_id, _ = _traceparent()
    client = openai.OpenAI(base_url=f"{traced.base_url}/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.completions.create(model=MODEL, prompt="one two three", max_tokens=3, n=2, stream=True,
                                       stream_options={"include_usage": True}, extra_headers={"traceparent": header})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    spans = _wait_spans(traced, collector, trace_id, 10)
    named = _by_name(spans)
    server = named["POST /v1/completions"][0]
    assert _attrs(server)["gen_ai.operation.name"] == "text_completion"
    assert _attrs(server)["gen_ai.usage.output_tokens"] == usage.completion_tokens
    llms = named["llm_request"]
    assert sorted(_attrs(s)["kubeinfer.choice_index"] for s in llms) == [0, 1]
    assert sum(_attrs(s)["gen_ai.usage.output_tokens"] for s in llms) == usage.completion_tokens
    assert all(s.parent_span_id == server.span_id for s in llms)
    assert sorted(s.parent_span_id for s in named["prefill"]) == sorted(s.span_id for s in llms)


def test_a_refused_request_is_traced_with_its_status(traced: ServerThread, collector: Collector) -> None:
    header, trace_id, _ = _traceparent()
    r = httpx.post(f"{traced.base_url}/v1/completions", json={"model": "no-such-model", "prompt": "x"},
                   headers={"traceparent": header}, timeout=30)
    assert r.status_code == 404
    [server] = _wait_spans(traced, collector, trace_id, 1)
    assert _attrs(server)["http.response.status_code"] == 404
    assert _attrs(server)["gen_ai.request.model"] == "no-such-model"


def test_probes_are_not_traced(traced: ServerThread, collector: Collector) -> None:
    header, trace_id, _ = _traceparent()
    assert httpx.get(f"{traced.base_url}/health", headers={"traceparent": header}, timeout=10).status_code == 200
    assert httpx.get(f"{traced.base_url}/v1/models", headers={"traceparent": header}, timeout=10).status_code == 200
    spans = _wait_spans(traced, collector, trace_id, 1)
    assert [s.name for s in spans] == ["GET /v1/models"]


def test_the_standard_variable_turns_traces_on_and_without_an_endpoint_there_are_none(
        collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)  # the exporter appends /v1/traces
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pod-a")
    srv = _serve(ServerSettings(host="127.0.0.1", port=0))
    try:
        header, trace_id, parent_id = _traceparent()
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        client.completions.create(model=MODEL, prompt="hello", max_tokens=2, extra_headers={"traceparent": header})
        spans = _wait_spans(srv, collector, trace_id, 6)
        assert {s.name for s in spans} >= {"POST /v1/completions", "llm_request", "decode"}
        assert {"service.name": "pod-a"}.items() <= collector.resources[-1].items()
    finally:
        srv.stop()

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    app = _app(ServerSettings())
    assert app.state.tracing is None
    assert not any(m.cls is RequestTraceMiddleware for m in app.user_middleware)
