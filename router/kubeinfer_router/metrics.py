"""The router's Prometheus metrics (``kubeinfer_router_*``), in their own registry, served on ``/metrics``.

| metric | type | labels | meaning |
|---|---|---|---|
| ``kubeinfer_router_requests_total`` | counter | model, endpoint, reason, code | client requests answered: the model asked for (ids no endpoint knows fold into ``other``, none: ``none``), the endpoint that answered last (``none`` if none did), the picker's reason (or ``hold_timeout`` / ``held_full`` / ``too_large`` / ``no_endpoint``) and the status the client got |
| ``kubeinfer_router_held_requests`` | gauge | | requests waiting for a usable endpoint now (KEDA's activation signal at zero) |
| ``kubeinfer_router_hold_timeouts_total`` | counter | | held requests answered 503 ``no_ready_endpoints`` (timed out or over ``--max-held-requests``) |
| ``kubeinfer_router_retries_total`` | counter | reason | requests sent again to another endpoint: ``connection_error`` or ``draining`` |
| ``kubeinfer_router_ejections_total`` | counter | endpoint | passive-health ejections |
| ``kubeinfer_router_endpoints`` | gauge | state | endpoints known now: ``ready``, ``ejected`` or ``unready`` (not ready, or draining) |
| ``kubeinfer_router_proxy_overhead_seconds`` | histogram | | the router's own time per request: from the request received to the upstream request started, plus relaying the response headers |
| ``kubeinfer_router_time_to_first_byte_seconds`` | histogram | endpoint | from the upstream request started to its response headers |
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from kubeinfer_router.state import EndpointState

#: The ``model`` label of requests whose model no endpoint reports (bounded label values).
OTHER_MODEL = "other"
#: The ``model`` / ``endpoint`` / ``reason`` label when there is none.
NONE = "none"
#: Buckets of the proxy-overhead histogram, seconds (the target is well under 3 ms).
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Buckets of the time-to-first-byte histogram, seconds (a non-streaming answer's first byte is its end).
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def endpoint_state(ep: EndpointState, now: float) -> str:
    """The ``state`` label of one endpoint: ``unready`` (not ready or draining), ``ejected`` or ``ready``."""
    if not ep.ready or ep.draining:
        return "unready"
    if now < ep.ejected_until:
        return "ejected"
    return "ready"


class _EndpointsCollector:
    """``kubeinfer_router_endpoints{state}``, counted from the endpoint table at scrape time."""

    def __init__(self, endpoints: Callable[[], Iterable[EndpointState]], clock: Callable[[], float]) -> None:
        self._endpoints = endpoints
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = {"ready": 0, "ejected": 0, "unready": 0}
        now = self._clock()
        for ep in self._endpoints():
            counts[endpoint_state(ep, now)] += 1
        family = GaugeMetricFamily("kubeinfer_router_endpoints", "Endpoints the router knows, by state",
                                   labels=["state"])
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family


class RouterMetrics:
    """Every ``kubeinfer_router_*`` metric (see the module docstring), in one registry.

    Args:
        endpoints: returns the endpoints now (``EndpointTable.all``), read at scrape time.
        clock: the monotonic clock the table's ``ejected_until`` uses, seconds.
    """

    def __init__(self, endpoints: Callable[[], Iterable[EndpointState]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kubeinfer_router_requests", "Client requests answered by the router",
                                ["model", "endpoint", "reason", "code"], registry=r)
        self.held = Gauge("kubeinfer_router_held_requests",
                          "Requests waiting for a usable endpoint now (KEDA activation signal)", registry=r)
        self.hold_timeouts = Counter("kubeinfer_router_hold_timeouts",
                                     "Held requests answered 503 no_ready_endpoints", registry=r)
        self.retries = Counter("kubeinfer_router_retries", "Requests retried on another endpoint",
                               ["reason"], registry=r)
        self.ejections = Counter("kubeinfer_router_ejections", "Passive-health ejections of an endpoint",
                                 ["endpoint"], registry=r)
        self.overhead = Histogram("kubeinfer_router_proxy_overhead_seconds",
                                  "Router's own time per request (before the upstream request + header relay)",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.ttfb = Histogram("kubeinfer_router_time_to_first_byte_seconds",
                              "Upstream request start to its response headers", ["endpoint"],
                              buckets=TTFB_BUCKETS, registry=r)
        r.register(_EndpointsCollector(endpoints, clock))
        self._endpoints = endpoints
        # labelled children by label values: ``labels()`` takes a lock and builds a key per call
        self._request_children: dict[tuple[str, str, str, int], Counter] = {}
        self._ttfb_children: dict[str, Histogram] = {}

    def count_request(self, model: str | None, endpoint: str, reason: str, code: int) -> None:
        """Count one answered request in ``kubeinfer_router_requests_total`` (``model`` as :meth:`model_label`
        bounds it)."""
        values = (self.model_label(model), endpoint, reason, code)
        child = self._request_children.get(values)
        if child is None:
            child = self._request_children[values] = self.requests.labels(*values[:3], str(code))
        child.inc()

    def observe_ttfb(self, endpoint: str, seconds: float) -> None:
        """One upstream time to first byte of ``endpoint`` (its name), seconds."""
        child = self._ttfb_children.get(endpoint)
        if child is None:
            child = self._ttfb_children[endpoint] = self.ttfb.labels(endpoint)
        child.observe(seconds)

    def model_label(self, model: str | None) -> str:
        """The bounded ``model`` label: the id if an endpoint reports it, ``other`` if not, ``none`` for no model."""
        if model is None:
            return NONE
        for ep in self._endpoints():
            if model in ep.models:
                return model
        return OTHER_MODEL

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
