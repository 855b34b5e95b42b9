"""Activator: what answers an InferenceService's Service while the isvc has no ready serving pod.

With ``scaling.autoscaler: keda`` and ``minReplicas: 0`` KEDA takes the serving Deployment to zero
when the isvc is idle. The operator then runs one small activator pod (this module, from the
operator's image) behind the isvc's Service, so a client never meets a refused connection:

- every API request gets **503** with OpenAI's error body (``code: scaled_to_zero``), a
  ``Retry-After`` header (seconds) and ``x-should-retry: true``. The official OpenAI clients retry
  503s by themselves and honour ``Retry-After`` up to 60 s, so a client with enough
  ``max_retries`` (``Retry-After`` x retries above the cold-start time) simply sees its request
  served once a serving pod is Ready.
- each refused request counts as *pending demand*: ``kubeinfer_activator_pending_requests`` on
  ``/metrics`` is the number of distinct requests (client address + SHA-256 of method, path and
  body, so a client retrying one request counts once) refused in the last ``window`` seconds.
  Prometheus scrapes it like a serving pod (same annotations) and the isvc's ScaledObject adds it
  to the queue length, so KEDA activates the Deployment (0 -> 1) when it exceeds
  ``activationQueueLength``.
- ``/health`` and ``/ready`` answer 200 (the activator's own probes).

The operator deletes the activator as soon as a serving pod is Ready. The activator never
talks to the Kubernetes API (no service-account token is mounted) and holds no request: the
design is the 503 + ``Retry-After`` answer the KEDA HTTP add-on documents as the alternative to
holding requests in a proxy (Knative's activator holds and proxies instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

log = logging.getLogger("kubeinfer.activator")

#: Largest request body read (bytes) to fingerprint a request; larger bodies get 413.
MAX_BODY_BYTES = 32 * 1024 * 1024


class PendingRequests:
    """Requests refused recently, deduplicated: key -> last time refused (monotonic seconds).

    Args:
        window: seconds a refused request keeps counting after its last attempt.
        clock: monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive seconds, got {window}")
        self.window = window
        self.clock = clock
        self._last: dict[str, float] = {}

    def record(self, key: str) -> None:
        """Note one refused attempt of the request identified by ``key``."""
        self._last[key] = self.clock()
        self._expire()

    def count(self) -> int:
        """Distinct requests refused within the last ``window`` seconds."""
        self._expire()
        return len(self._last)

    def _expire(self) -> None:
        cutoff = self.clock() - self.window
        for key in [k for k, t in self._last.items() if t < cutoff]:
            del self._last[key]


def request_key(peer: str, method: str, path: str, body: bytes) -> str:
    """Identity of a request across its retries: SHA-256 over client address, method, path and body."""
    digest = hashlib.sha256()
    for part in (peer.encode(), method.encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def scaled_to_zero_body(isvc: str) -> dict:
    """OpenAI's error object for a request that reached the activator."""
    return {
        "error": {
            "message": (f"InferenceService {isvc} is scaled to zero and is starting a serving pod for this "
                        "request; retry after the Retry-After header's seconds"),
            "type": "service_unavailable",
            "param": None,
            "code": "scaled_to_zero",
        }
    }


def create_app(isvc: str, retry_after: int, window: float, clock: Callable[[], float] = time.monotonic) -> web.Application:
    """The activator's aiohttp application.

    Args:
        isvc: the InferenceService's name (in messages).
        retry_after: ``Retry-After`` sent with every 503, in whole seconds (>= 1).
        window: seconds a refused request counts as pending (see :class:`PendingRequests`).
        clock: monotonic clock in seconds.

    Raises:
        ValueError: ``retry_after`` < 1 or ``window`` <= 0.
    """
    if retry_after < 1:
        raise ValueError(f"retry_after must be at least 1 second, got {retry_after}")
    pending = PendingRequests(window, clock)
    registry = CollectorRegistry()
    gauge = Gauge("kubeinfer_activator_pending_requests",
                  "Distinct requests the activator refused (503 scaled_to_zero) within its window",
                  registry=registry)
    gauge.set_function(pending.count)
    refused = Counter("kubeinfer_activator_requests", "Requests the activator answered with 503 scaled_to_zero",
                      registry=registry)
    body = json.dumps(scaled_to_zero_body(isvc))

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def refuse(request: web.Request) -> web.Response:
        try:
            payload = await request.read()
        except web.HTTPRequestEntityTooLarge:
            payload = b"<too large>"
        pending.record(request_key(request.remote or "", request.method, request.path_qs, payload))
        refused.inc()
        log.info("refused %s %s from %s: scaled to zero (%d pending)", request.method, request.path,
                 request.remote, pending.count())
        return web.Response(status=503, text=body, content_type="application/json",
                            headers={"Retry-After": str(retry_after), "x-should-retry": "true"})

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app["pending"] = pending
    app.router.add_get("/health", health)
    app.router.add_get("/ready", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", refuse)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m kubeinfer_operator.activator --isvc NAME [--port 8000] [--retry-after 5] [--window 60]``."""
    parser = argparse.ArgumentParser(prog="kubeinfer-activator", description=__doc__.splitlines()[0])
    parser.add_argument("--isvc", required=True, help="the InferenceService's name")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--retry-after", type=int, default=5, help="Retry-After of the 503, seconds")
    parser.add_argument("--window", type=float, default=60.0, help="seconds a refused request counts as pending")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(create_app(args.isvc, args.retry_after, args.window), host=args.host, port=args.port,
                access_log=None, print=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
