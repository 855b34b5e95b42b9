"""Per-endpoint state of the router and its one owner, :class:`EndpointTable`.

Three sources write it: discovery (:meth:`EndpointTable.sync`: which endpoints exist and are ready),
the pods (:meth:`EndpointTable.apply_report` for a ``GET /kubeinfer/load`` body about once a second,
:meth:`EndpointTable.apply_resident_header` for the ``x-kubeinfer-resident`` header of every answer,
so a load this router caused is seen at once), and the proxy (:meth:`EndpointTable.begin` /
:meth:`EndpointTable.end` around each forwarded request; failures and successes for passive health).
The picker only reads it. Everything runs on one asyncio loop, so there are no locks.

Time-to-first-byte is smoothed with an exponential moving average, ``ema = a*x + (1-a)*ema`` with
``a = 0.2`` (:data:`TTFB_EMA_ALPHA`), as in the "intelligent" balancer this project grew from.
"""

from __future__ import annotations

import enum
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubeinfer_router.health import EjectionPolicy

#: Weight of the newest sample in the time-to-first-byte EMA.
TTFB_EMA_ALPHA = 0.2


class Tier(str, enum.Enum):
    """Where a model is on a pod, best first: loaded in the engine, warm tier, disk tier, not there."""

    DEVICE = "device"  # loaded in the engine (GPU memory, or the CPU device on a CPU pod)
    HOST = "host"  # weights in the pod's warm tier (host RAM)
    DISK = "disk"  # weights in the pod's disk tier
    ABSENT = "absent"  # not on the pod (a load fetches it from its source)

    @property
    def rank(self) -> int:
        """0 for DEVICE (best) .. 3 for ABSENT (worst)."""
        return _TIER_RANK[self]


_TIER_RANK = {Tier.DEVICE: 0, Tier.HOST: 1, Tier.DISK: 2, Tier.ABSENT: 3}


@dataclass(eq=False)
class EndpointState:
    """What the router knows about one serving endpoint (one pod's HTTP port).

    Units: seconds for times (monotonic clock), bytes for memory, counts for requests. Compared and
    hashed by identity: it is the one mutable record of its endpoint, owned by the table.
    """

    url: str  # base URL, "http://10.1.2.3:8000" (no trailing slash)
    name: str  # pod name or the URL (for metric labels and the response header)
    ready: bool = True  # from discovery
    models: dict[str, Tier] = field(default_factory=dict)  # model/adapter id -> tier
    parents: dict[str, str] = field(default_factory=dict)  # adapter id -> base model id
    inflight: int = 0  # requests through THIS router now (the CHWBL load)
    queue_length: int = 0  # pod-reported waiting requests (all models)
    running: int = 0  # pod-reported running requests
    kv_cache_usage: float = 0.0  # pod-reported, 0..1 (max over its models)
    free_bytes: int | None = None  # pod memory budget left (None: unknown)
    evictable_bytes: int | None = None  # bytes of loaded idle, non-preloaded models
    draining: bool = False
    ttfb_ema: float | None = None  # seconds, EMA of time to first byte through this router
    consecutive_failures: int = 0
    ejected_until: float = 0.0  # monotonic seconds; ejected while now < ejected_until
    ejection_count: int = 0  # for the backoff
    last_report: float | None = None  # monotonic time of the last good /kubeinfer/load
    warm_tier: bool = False  # the last report said the pod has a warm (host RAM) tier
    model_bytes: dict[str, int] = field(default_factory=dict)  # model id -> bytes, when reported
    loading: frozenset[str] = frozenset()  # ids the last report said are loading (any router's request)
    max_loaded_models: int | None = None  # the pod's maxLoadedModels (None: no count limit, or unknown)
    loaded_models: int = 0  # slots of that limit held (loaded, loading or being evicted models)


class EndpointTable:
    """The one owner of every :class:`EndpointState`. Single asyncio loop: no locks.

    Args:
        clock: monotonic seconds (injectable for tests).
        policy: the passive-health policy (``EjectionPolicy()`` when None).

    Methods taking a ``url`` ignore URLs the table does not hold (an endpoint discovery dropped while
    a request or a poll to it was still running).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 policy: EjectionPolicy | None = None) -> None:
        self.clock = clock
        self.policy = policy if policy is not None else EjectionPolicy()
        self._endpoints: dict[str, EndpointState] = {}

    def sync(self, endpoints: dict[str, tuple[str, bool]]) -> None:
        """Make the table match discovery: ``url -> (name, ready)``; adds new endpoints, updates the
        name and readiness of known ones (keeping their learned state), drops the ones not listed."""
        for url in list(self._endpoints):
            if url not in endpoints:
                del self._endpoints[url]
        for url, (name, ready) in endpoints.items():
            ep = self._endpoints.get(url)
            if ep is None:
                self._endpoints[url] = EndpointState(url=url, name=name, ready=ready)
            else:
                ep.name = name
                ep.ready = ready

    def all(self) -> list[EndpointState]:
        """Every endpoint, in discovery order."""
        return list(self._endpoints.values())

    def get(self, url: str) -> EndpointState | None:
        """The endpoint with base URL ``url``, or None."""
        return self._endpoints.get(url)

    def apply_report(self, url: str, report: dict[str, Any]) -> None:
        """Take in one ``GET /kubeinfer/load`` body (see ROUTER_SPEC.md) and stamp ``last_report``.

        Missing or ill-typed scalar fields keep a neutral value (0, False, None); a model entry
        without a known ``tier`` counts as DEVICE when its ``state`` is ``loaded``, else ABSENT.
        Entries whose ``state`` is ``loading`` make :attr:`EndpointState.loading` (a load any
        router, or a client of the plain Service, started there); ``memory.max_loaded_models`` and
        ``memory.loaded_models`` give the pod's model-count limit and the slots it holds.
        The model list replaces the one from earlier reports and headers.

        Raises:
            ValueError: ``report`` is not an object, or its ``models`` is not a list of objects
                with a string ``id`` (the endpoint's state is left unchanged).
        """
        if not isinstance(report, dict):
            raise ValueError(f"a load report must be a JSON object, got {type(report).__name__}")
        entries = report.get("models", [])
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries):
            raise ValueError("a load report's 'models' must be a list of objects with a string 'id'")
        ep = self._endpoints.get(url)
        if ep is None:
            return
        models: dict[str, Tier] = {}
        parents: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for entry in entries:
            model_id = entry["id"]
            models[model_id] = _entry_tier(entry)
            if isinstance(entry.get("parent"), str):
                parents[model_id] = entry["parent"]
            if _is_int(entry.get("bytes")):
                sizes[model_id] = entry["bytes"]
        memory = report.get("memory") if isinstance(report.get("memory"), dict) else {}
        budget, used = memory.get("budget_bytes"), memory.get("used_bytes")
        ep.models, ep.parents, ep.model_bytes = models, parents, sizes
        ep.loading = frozenset(entry["id"] for entry in entries if entry.get("state") == "loading")
        ep.queue_length = _int_or(report.get("queue_length"), 0)
        ep.running = _int_or(report.get("running"), 0)
        usage = report.get("kv_cache_usage")
        ep.kv_cache_usage = float(usage) if _is_number(usage) else 0.0
        ep.draining = report.get("draining") is True
        ep.warm_tier = report.get("warm_tier") is True
        ep.free_bytes = max(budget - used, 0) if _is_int(budget) and _is_int(used) else None
        evictable = memory.get("evictable_bytes")
        ep.evictable_bytes = evictable if _is_int(evictable) else None
        limit = memory.get("max_loaded_models")
        ep.max_loaded_models = limit if _is_int(limit) else None
        ep.loaded_models = _int_or(memory.get("loaded_models"), 0)
        ep.last_report = self.clock()

    def apply_resident_header(self, url: str, model: str | None, header: str | None,
                              status: int | None = None) -> None:
        """Take in the ``x-kubeinfer-resident`` header of one answer of the endpoint.

        Args:
            url: the endpoint's base URL.
            model: the model id the request asked for (None when the body had none).
            header: the header's value (percent-encoded ids joined by ``", "``), or None when the
                answer had no such header.
            status: the answer's HTTP status, or None (taken as 2xx).

        Listed ids become DEVICE; ids that were DEVICE and are not listed become HOST when the pod's
        last report said it has a warm tier, else ABSENT. Without the header a 2xx answer still
        proves ``model`` is on the device; a non-2xx answer without the header changes nothing.
        """
        ep = self._endpoints.get(url)
        if ep is None:
            return
        if header is None:
            if model and (status is None or 200 <= status < 300):
                ep.models[model] = Tier.DEVICE
            return
        listed = {urllib.parse.unquote(part.strip()) for part in header.split(",") if part.strip()}
        demoted = Tier.HOST if ep.warm_tier else Tier.ABSENT
        for model_id, tier in list(ep.models.items()):
            if tier is Tier.DEVICE and model_id not in listed:
                ep.models[model_id] = demoted
        for model_id in listed:
            ep.models[model_id] = Tier.DEVICE

    def begin(self, url: str) -> None:
        """One more request through this router is in flight on ``url``."""
        ep = self._endpoints.get(url)
        if ep is not None:
            ep.inflight += 1

    def end(self, url: str, ttfb_seconds: float | None) -> None:
        """A request on ``url`` finished; ``ttfb_seconds`` (time to first byte, when the endpoint sent
        one) updates the EMA with weight :data:`TTFB_EMA_ALPHA` (the first sample sets it)."""
        ep = self._endpoints.get(url)
        if ep is None:
            return
        ep.inflight = max(ep.inflight - 1, 0)
        if ttfb_seconds is not None:
            ep.ttfb_ema = (ttfb_seconds if ep.ttfb_ema is None
                           else TTFB_EMA_ALPHA * ttfb_seconds + (1 - TTFB_EMA_ALPHA) * ep.ttfb_ema)

    def record_failure(self, url: str) -> bool:
        """A failure of ``url`` (see ``health.is_failure``); True when it ejected the endpoint."""
        ep = self._endpoints.get(url)
        return ep is not None and self.policy.record_failure(ep, self.clock())

    def record_success(self, url: str) -> None:
        """A success of ``url``: resets its failure count (and its ejection history once re-admitted)."""
        ep = self._endpoints.get(url)
        if ep is not None:
            self.policy.record_success(ep, self.clock())

    def mark_draining(self, url: str) -> None:
        """The endpoint said it is shutting down (a 503 ``server_shutting_down``): pick it no more
        until a report says otherwise."""
        ep = self._endpoints.get(url)
        if ep is not None:
            ep.draining = True

    def models_view(self) -> dict[str, list[tuple[EndpointState, Tier]]]:
        """Model id -> the endpoints that know it with its tier there, best tier first (then by name);
        ids sorted. For the router's ``/v1/models``."""
        view: dict[str, list[tuple[EndpointState, Tier]]] = {}
        for ep in self._endpoints.values():
            for model_id, tier in ep.models.items():
                view.setdefault(model_id, []).append((ep, tier))
        return {model_id: sorted(view[model_id], key=lambda pair: (pair[1].rank, pair[0].name))
                for model_id in sorted(view)}


def _entry_tier(entry: dict[str, Any]) -> Tier:
    tier = entry.get("tier")
    try:
        return Tier(tier)
    except ValueError:
        return Tier.DEVICE if entry.get("state") == "loaded" else Tier.ABSENT


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_or(value: Any, default: int) -> int:
    return value if _is_int(value) else default
