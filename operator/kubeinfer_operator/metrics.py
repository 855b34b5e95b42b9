"""The operator's own Prometheus metrics and its readiness, served on one small HTTP port.

``GET /metrics``: the series below, in Prometheus' text format (prometheus-client). ``GET /readyz``:
200 ``ok`` once the operator has started and its last Kubernetes API contact succeeded, else 503
with the reason (a broken API connection or missing RBAC shows as NotReady, not as a silent
operator). kopf's own liveness endpoint (``--liveness``, ``/healthz``) stays as it is.

Series (all prefixed ``kubeinfer_operator_``):

* ``reconciles_total{result}``: reconciles by outcome: ``ok``, ``invalid_spec`` (Ready=False,
  reason InvalidSpec), ``error`` (an API failure; retried), ``not_found`` (deleted meanwhile).
* ``reconcile_duration_seconds``: histogram of one reconcile's wall time, API calls and the
  ``/v1/models`` poll included.
* ``reconciles_in_progress``: reconciles running now (the backlog of kopf's worker threads).
* ``api_errors_total{code}``: failed Kubernetes API calls by HTTP status (``0``: no response, e.g.
  connection refused or timeout).
* ``model_polls_total{result}``: serving pods asked for ``GET /v1/models`` (``ok`` or ``error``;
  answers reused from the poller's cache are not counted).
* ``inferenceservices``: InferenceServices the last resync listed.

The series live in their own registry (:data:`REGISTRY`), apart from the process-global default
one, so the serving pod's metrics never mix in when both run in one process (tests).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

#: Port of ``/metrics`` and ``/readyz`` (container port named ``metrics`` in the chart).
METRICS_PORT = 8081
REGISTRY = CollectorRegistry(auto_describe=True)
#: ``result`` label values of :data:`RECONCILES`.
OK, INVALID_SPEC, ERROR, NOT_FOUND = "ok", "invalid_spec", "error", "not_found"

RECONCILES = Counter("kubeinfer_operator_reconciles", "InferenceService reconciles by result.", ["result"],
                     registry=REGISTRY)
RECONCILE_SECONDS = Histogram(
    "kubeinfer_operator_reconcile_duration_seconds", "Wall time of one reconcile, in seconds.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), registry=REGISTRY,
)
IN_PROGRESS = Gauge("kubeinfer_operator_reconciles_in_progress", "Reconciles running now.", registry=REGISTRY)
API_ERRORS = Counter("kubeinfer_operator_api_errors", "Failed Kubernetes API calls by HTTP status (0: no response).",
                     ["code"], registry=REGISTRY)
MODEL_POLLS = Counter("kubeinfer_operator_model_polls", "Serving pods asked for GET /v1/models, by result.",
                      ["result"], registry=REGISTRY)
INFERENCESERVICES = Gauge("kubeinfer_operator_inferenceservices", "InferenceServices the last resync listed.",
                          registry=REGISTRY)

for _result in (OK, INVALID_SPEC, ERROR, NOT_FOUND):  # every series exists from the start (rate() needs it)
    RECONCILES.labels(result=_result)
for _result in ("ok", "error"):
    MODEL_POLLS.labels(result=_result)


class Health:
    """Readiness state: started, and whether the last API contact succeeded (with why not)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._api_error: str | None = None

    def mark_started(self) -> None:
        """The operator's startup handlers ran (reconciler built, resync running)."""
        with self._lock:
            self._started = True

    def api_ok(self) -> None:
        """An API call succeeded."""
        with self._lock:
            self._api_error = None

    def api_failed(self, message: str) -> None:
        """An API call failed without a response or with a 5xx/401/403: the operator cannot work."""
        with self._lock:
            self._api_error = message

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ``(True, "ok")``, or False with what is missing."""
        with self._lock:
            if not self._started:
                return False, "starting"
            if self._api_error is not None:
                return False, f"kubernetes API: {self._api_error}"
            return True, "ok"


#: The process' readiness (one operator per process).
HEALTH = Health()


def record_api_error(status: int) -> None:
    """Count one failed API call; a failure that says the operator cannot talk to the API (no
    response, 401, 403, 5xx) also makes it NotReady until a call succeeds again."""
    API_ERRORS.labels(code=str(status)).inc()
    if status == 0 or status in (401, 403) or status >= 500:
        HEALTH.api_failed(f"HTTP {status}" if status else "no response")


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] == "/metrics":
            body, status, ctype = generate_latest(REGISTRY), 200, CONTENT_TYPE_LATEST
        elif self.path.split("?", 1)[0] == "/readyz":
            ready, reason = HEALTH.readiness()
            body, status, ctype = reason.encode(), (200 if ready else 503), "text/plain; charset=utf-8"
        else:
            body, status, ctype = b"not found\n", 404, "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (scrapes are not news)
        return


def serve(host: str, port: int) -> ThreadingHTTPServer:
    """Start serving ``/metrics`` and ``/readyz`` on ``host:port`` in a daemon thread; returns the
    server (``server.server_address`` has the bound port when ``port`` is 0; ``shutdown()`` stops it).

    Raises:
        OSError: the address cannot be bound.
    """
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="operator-metrics", daemon=True).start()
    return server


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:8081`` for IPv6) -> (host, port).

    Raises:
        ValueError: no port, or one that is not a number in 0-65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {address!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
