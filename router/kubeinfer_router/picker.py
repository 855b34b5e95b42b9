"""Which endpoint serves a request: filter -> residency -> urgent -> imbalance gate -> CHWBL -> cold.

The shape is the Gateway API Inference Extension's endpoint picker (filters drop endpoints, then
the survivors are ranked and one is picked; ``pkg/epp/scheduling`` in
kubernetes-sigs/gateway-api-inference-extension, where llm-d found that a prefix signal without a
load term collapses under skew), with the ranking done by consistent hashing with bounded loads as in
KubeAI's ``PrefixHash`` balancer (``internal/loadbalancer/balance_chwbl.go``) and SGLang's
cache-aware router's imbalance gate in front of it (``sgl-router/src/policies/cache_aware.rs``). The
steps, in order; each decision carries the reason of the step that made it (:data:`REASONS`):

1. **Filter.** Drop endpoints that are unready (discovery), draining, ejected (passive health) or in
   ``exclude`` (already tried by this request). None left: :meth:`Picker.pick` returns None (the
   proxy holds the request or answers 503). One left: ``only``. No model in the body: the least
   loaded one, ``any``.
2. **Residency.** The candidates are the endpoints holding the model in the best tier any of them
   has (DEVICE > HOST > DISK). When none holds it the request is *cold* (step 6).
3. **Urgent.** ``priority < 0``: the candidate with the lowest time-to-first-byte EMA (unknown EMAs
   last, then the least loaded), ``urgent``.
4. **Imbalance gate** (SGLang's, thresholds ``imbalance_min_requests`` = 64 and ``imbalance_ratio``
   = 1.5): when every candidate is busy and some other endpoint is idle by comparison
   (``min(candidates) > min_requests`` and ``> ratio * min(others)``), the least loaded other
   endpoint, so a hot model spreads to another replica instead of queueing on its holders; else when
   the candidates are imbalanced among themselves (``max > min_requests`` and ``max > ratio * min``),
   the least loaded candidate. Both ``imbalance``. SGLang's own gate tests ``max - min`` against the
   absolute threshold; this one, as the router's contract states, tests ``max``.
   The gate's load is ``max(inflight, queue_length + running)``: the pod's own count also covers the
   other router replicas' requests, which this router's ``inflight`` does not see.
5. **Affinity, then CHWBL.** The bound is ``cap = ceil(mean * load_factor)``, ``mean = (sum of
   candidates' inflight + 1) / n`` (the KubeAI / Vimeo formulation of Mirrokni et al.'s bound); no
   step below ever picks an endpoint with ``inflight + 1 > cap``.

   a. **Affinity** (llm-d's prefix scorer, SGLang's cache-aware routing): the endpoints this picker
      sent the same key ``(model, adapter, affinity)`` to within ``affinity_ttl_seconds``
      (:class:`~kubeinfer_router.affinity.AffinityMemory`), the one the key was placed on first
      leading: the first one under the bound, ``affinity``. Its prefix cache most likely still
      holds the key's prefix, so a key that once spilled to a second endpoint under load goes back
      to one that holds it instead of to a third, and its first holder takes all it can (the
      others only its overflow), so one pod's copy of the prefix stays hot.
   b. **CHWBL.** A ring (:class:`~kubeinfer_router.ring.HashRing`) over the candidates, keyed by
      ``(model, adapter, affinity)``; walk clockwise and take the first endpoint under the bound.
      For a key no candidate holds yet, the walk also skips endpoints that already hold more than
      their share of keys: ``keys + 1 <= ceil((sum of candidates' keys + 1) / n * key_load_factor)``
      (the same bound on remembered key counts, strict by default: :data:`KEY_LOAD_FACTOR`), so a
      handful of large prefix groups spreads evenly over the replicas instead of the ring putting
      half of them on one (with many keys the ring is even by itself and the bound rarely acts);
      when no endpoint passes both bounds, the in-flight bound alone decides. ``hash`` when the walk's first endpoint was taken,
      ``hash_spill`` otherwise. Some endpoint always passes the in-flight bound (the least loaded
      has ``inflight < mean``).

   Every warm decision (steps 3-5) is remembered: its endpoint becomes (or stays) a holder of the key.
6. **Cold.** No endpoint holds the model. Its holders are then the endpoints loading it: the
   ones whose report says its load runs (started by any router replica, or a client of the plain
   Service), and the ones this picker sent it to within ``cold_claim_seconds`` (a load they are
   doing is not reported yet), so a burst of requests for a cold model loads it once, not on every
   replica. Only models some endpoint's catalogue lists are claimed (a misspelt model id, answered
   404, claims nothing). Otherwise the candidates are, first non-empty of: endpoints that can load
   it without evicting anything (nothing on the device or loading and a free ``maxLoadedModels``
   slot, or free budget >= the model's reported bytes), endpoints with enough idle evictable bytes,
   all. Skipped: endpoints claimed for another model. Steps 3-5 then run over them, with the
   model's *home* tried first: every catalogue model (an adapter follows its base) is placed on the
   usable endpoints by :func:`~kubeinfer_router.ring.bounded_assignment`, at most
   ``ceil(models / endpoints)`` per endpoint. The home depends only on the catalogue and the
   endpoint set, which every router replica sees alike, so replicas deciding at the same moment put
   different cold models on different pods (each replica's ring alone put two of three models on
   one pod about two times in three, and with ``maxLoadedModels: 1`` that pod then evicts one model
   for the other on every switch). Past the home the ring keyed by ``(model, adapter)`` decides, so
   each model settles on the same few replicas whatever the prompts while load is low.
   ``cold_memory`` when the memory preference narrowed the candidates, else ``cold_hash``.

Pure logic: the clock is injectable, there is no I/O; one instance per router (it caches rings and
remembers cold claims), used from one asyncio loop.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kubeinfer_router.affinity import DEFAULT_MAX_KEYS, DEFAULT_TTL_SECONDS, AffinityMemory
from kubeinfer_router.health import is_ejected
from kubeinfer_router.keys import RoutingKey
from kubeinfer_router.ring import DEFAULT_VIRTUAL_NODES, HashRing, bounded_assignment
from kubeinfer_router.state import EndpointState, Tier

__all__ = ["REASONS", "Decision", "Picker", "RoutingKey"]

#: Every value of :attr:`Decision.reason` (the ``reason`` label of the router's request metric).
REASONS = ("affinity", "hash", "hash_spill", "imbalance", "urgent", "cold_hash", "cold_memory", "only", "any")

_RESIDENT_TIERS = (Tier.DEVICE, Tier.HOST, Tier.DISK)
_RING_CACHE_SIZE = 64
#: Default bound factor on remembered keys per endpoint for a new key (1.0: key counts differ by at
#: most one where the in-flight bound allows). Strict, unlike the in-flight bound, because a key's
#: placement lasts (its later requests follow it) while an in-flight count changes every request.
KEY_LOAD_FACTOR = 1.0
# Guards ceil() against float error when mean * load_factor is an integer (e.g. 2.0000000000000004).
_CEIL_EPSILON = 1e-9


@dataclass(frozen=True)
class Decision:
    """The endpoint picked for one attempt and why (one of :data:`REASONS`)."""

    endpoint: EndpointState
    reason: str


class Picker:
    """Picks an endpoint per request; see the module docstring for the steps.

    Args:
        load_factor: CHWBL bound factor (>= 1): no endpoint gets more than
            ``ceil(mean_inflight * load_factor)`` in-flight requests through this router.
        virtual_nodes: ring points per endpoint (>= 1).
        imbalance_min_requests: the gate's absolute threshold (requests, >= 0).
        imbalance_ratio: the gate's relative threshold (>= 1).
        clock: monotonic seconds (for ejections and cold claims).
        cold_claim_seconds: how long a cold pick counts as "this endpoint is loading the model"
            (seconds, >= 0; 0 disables claims).
        affinity_ttl_seconds: how long a key's endpoint is remembered without another request of
            the key there (seconds, > 0).
        affinity_keys: most keys remembered (>= 1).
        key_load_factor: bound factor on remembered keys per endpoint when placing a new key (>= 1).

    Raises:
        ValueError: a parameter is out of its range.
    """

    def __init__(self, load_factor: float = 1.25, virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
                 imbalance_min_requests: int = 64, imbalance_ratio: float = 1.5,
                 clock: Callable[[], float] = time.monotonic, cold_claim_seconds: float = 30.0,
                 affinity_ttl_seconds: float = DEFAULT_TTL_SECONDS, affinity_keys: int = DEFAULT_MAX_KEYS,
                 key_load_factor: float = KEY_LOAD_FACTOR) -> None:
        if load_factor < 1.0 or key_load_factor < 1.0:
            raise ValueError(f"load_factor and key_load_factor must be >= 1, got {load_factor}, {key_load_factor}")
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        if imbalance_min_requests < 0 or imbalance_ratio < 1.0:
            raise ValueError(f"need imbalance_min_requests >= 0 and imbalance_ratio >= 1, got "
                             f"{imbalance_min_requests}, {imbalance_ratio}")
        if cold_claim_seconds < 0:
            raise ValueError(f"cold_claim_seconds must be >= 0, got {cold_claim_seconds}")
        self.load_factor = load_factor
        self.key_load_factor = key_load_factor
        self.virtual_nodes = virtual_nodes
        self.imbalance_min_requests = imbalance_min_requests
        self.imbalance_ratio = imbalance_ratio
        self.clock = clock
        self.cold_claim_seconds = cold_claim_seconds
        self.affinity = AffinityMemory(affinity_ttl_seconds, affinity_keys)
        self._rings: OrderedDict[frozenset[str], HashRing] = OrderedDict()
        # (endpoint URLs, base model ids) -> base model id -> home URL (the last one computed)
        self._homes: tuple[frozenset[str], frozenset[str], dict[str, str]] | None = None
        # (model, adapter) -> endpoint URL -> monotonic time the claim ends
        self._claims: dict[tuple[str, str | None], dict[str, float]] = {}

    def pick(self, endpoints: list[EndpointState], key: RoutingKey, priority: int = 0,
             exclude: frozenset[str] = frozenset()) -> Decision | None:
        """The endpoint for one attempt of a request, or None when no endpoint is usable.

        Args:
            endpoints: every known endpoint (``EndpointTable.all()``).
            key: the request's routing key.
            priority: the request's ``priority``; below 0 is urgent.
            exclude: URLs this request already failed on (retries go elsewhere).
        """
        now = self.clock()
        usable = [ep for ep in endpoints
                  if ep.ready and not ep.draining and not is_ejected(ep, now) and ep.url not in exclude]
        if not usable:
            return None
        if len(usable) == 1:
            return Decision(usable[0], "only")
        if key.model is None:
            return Decision(min(usable, key=self._least_loaded_order), "any")
        holders = _best_holders(usable, key.model)
        if holders:
            ring_key = "\x00".join((key.model, key.adapter or "", key.affinity))
            decision = self._choose(usable, holders, ring_key, priority, "hash", "hash_spill", now)
            self.affinity.record(ring_key, decision.endpoint.url, now)
            return decision
        return self._pick_cold(usable, key.model, key.adapter, priority, now)

    def _pick_cold(self, usable: list[EndpointState], model: str, adapter: str | None, priority: int,
                   now: float) -> Decision:
        claim_key = (model, adapter)
        self._prune_claims(now)
        claimed = self._claims.get(claim_key, {})
        ring_key = "\x00".join((model, adapter or ""))
        candidates = [ep for ep in usable if ep.url in claimed or model in ep.loading]
        reason = "cold_hash"
        if not candidates:
            busy = {url for other, urls in self._claims.items() if other != claim_key for url in urls}
            candidates, narrowed = _cold_candidates(usable, model, busy)
            reason = "cold_memory" if narrowed else "cold_hash"
        decision = self._choose(usable, candidates, ring_key, priority, reason, reason,
                                home=self._home(usable, model))
        if self.cold_claim_seconds > 0 and any(model in ep.models for ep in usable):
            self._claims.setdefault(claim_key, {})[decision.endpoint.url] = now + self.cold_claim_seconds
        return decision

    def _home(self, usable: list[EndpointState], model: str) -> str | None:
        """The URL ``model`` (its base, for an adapter) is placed on by the bounded assignment of the
        catalogue's base models over ``usable``; None for a model no catalogue lists."""
        parents: dict[str, str] = {}
        for ep in usable:
            parents.update(ep.parents)
        base = parents.get(model, model)
        bases = frozenset(m for ep in usable for m in ep.models if m not in parents)
        if base not in bases:
            return None
        urls = frozenset(ep.url for ep in usable)
        if self._homes is None or self._homes[0] != urls or self._homes[1] != bases:
            self._homes = (urls, bases, bounded_assignment(self._ring(urls), bases))
        return self._homes[2].get(base)

    def _choose(self, usable: list[EndpointState], candidates: list[EndpointState], ring_key: str,
                priority: int, first_reason: str, spill_reason: str, now: float | None = None,
                home: str | None = None) -> Decision:
        """Steps 3-5 over ``candidates`` (a non-empty subset of ``usable``); with ``now`` (warm picks)
        step 5 consults the affinity memory, without it (cold picks) ``home`` (when a candidate
        under the bound) and then the ring decide."""
        if priority < 0:
            return Decision(min(candidates, key=_fastest_order), "urgent")
        least = min(candidates, key=self._least_loaded_order)
        if len(candidates) < len(usable):
            inside = {ep.url for ep in candidates}
            other = min((ep for ep in usable if ep.url not in inside), key=self._least_loaded_order)
            if self._imbalanced(gate_load(least), gate_load(other)):
                return Decision(other, "imbalance")
        busiest = max(gate_load(ep) for ep in candidates)
        if self._imbalanced(busiest, gate_load(least)):
            return Decision(least, "imbalance")
        if now is None:
            endpoint, first = self._bounded_walk(candidates, ring_key, home)
            return Decision(endpoint, first_reason if first else spill_reason)
        return self._affine_walk(candidates, ring_key, now, first_reason, spill_reason)

    def _imbalanced(self, high: int, low: int) -> bool:
        return high > self.imbalance_min_requests and high > self.imbalance_ratio * low

    def _bounded_walk(self, candidates: list[EndpointState], ring_key: str,
                      home: str | None = None) -> tuple[EndpointState, bool]:
        """CHWBL: ``home`` when it is a candidate under the bound, else the first endpoint clockwise
        from ``ring_key`` under the bound; and whether that was the first choice."""
        by_url = {ep.url: ep for ep in candidates}
        cap = self._cap(ep.inflight for ep in candidates)
        if home in by_url and by_url[home].inflight + 1 <= cap:
            return by_url[home], True
        for index, url in enumerate(self._ring(by_url).walk(ring_key)):
            endpoint = by_url[url]
            if endpoint.inflight + 1 <= cap:
                return endpoint, index == 0
        return min(candidates, key=self._least_loaded_order), False  # unreachable with load_factor >= 1

    def _affine_walk(self, candidates: list[EndpointState], ring_key: str, now: float, first_reason: str,
                     spill_reason: str) -> Decision:
        """Step 5: a remembered holder under the bound, else the ring walk (with the key bound for a new key)."""
        by_url = {ep.url: ep for ep in candidates}
        cap = self._cap(ep.inflight for ep in candidates)
        held = False
        for url in self.affinity.holders(ring_key, now):
            endpoint = by_url.get(url)
            if endpoint is None:
                continue
            held = True
            if endpoint.inflight + 1 <= cap:
                return Decision(endpoint, "affinity")
        walk = self._ring(by_url).walk(ring_key)  # lazy: most picks stop at the first endpoint
        if not held:
            key_cap = self._cap((self.affinity.keys_of(url) for url in by_url), self.key_load_factor)
            walked: list[str] = []
            for url in walk:
                walked.append(url)
                endpoint = by_url[url]
                if endpoint.inflight + 1 <= cap and self.affinity.keys_of(url) + 1 <= key_cap:
                    return Decision(endpoint, first_reason if len(walked) == 1 else spill_reason)
            walk = iter(walked)
        for index, url in enumerate(walk):
            endpoint = by_url[url]
            if endpoint.inflight + 1 <= cap:
                return Decision(endpoint, first_reason if index == 0 else spill_reason)
        return Decision(min(candidates, key=self._least_loaded_order), spill_reason)  # unreachable

    def _cap(self, loads: Iterable[int], factor: float | None = None) -> int:
        """The bound ``ceil((sum(loads) + 1) / n * factor)`` over one load per candidate (``factor``
        defaults to ``load_factor``)."""
        values = list(loads)
        factor = self.load_factor if factor is None else factor
        return math.ceil((sum(values) + 1) / len(values) * factor - _CEIL_EPSILON)

    def _ring(self, urls: Iterable[str]) -> HashRing:
        nodes = frozenset(urls)
        ring = self._rings.get(nodes)
        if ring is None:
            ring = HashRing(nodes, self.virtual_nodes)
            self._rings[nodes] = ring
            if len(self._rings) > _RING_CACHE_SIZE:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(nodes)
        return ring

    def _prune_claims(self, now: float) -> None:
        for claim_key in list(self._claims):
            live = {url: until for url, until in self._claims[claim_key].items() if until > now}
            if live:
                self._claims[claim_key] = live
            else:
                del self._claims[claim_key]

    @staticmethod
    def _least_loaded_order(ep: EndpointState) -> tuple[int, int, str]:
        return gate_load(ep), ep.inflight, ep.url


def gate_load(ep: EndpointState) -> int:
    """The imbalance gate's load of ``ep``: ``max(inflight, queue_length + running)`` (requests)."""
    return max(ep.inflight, ep.queue_length + ep.running)


def _fastest_order(ep: EndpointState) -> tuple[bool, float, int, str]:
    return ep.ttfb_ema is None, ep.ttfb_ema or 0.0, gate_load(ep), ep.url


def _best_holders(usable: list[EndpointState], model: str) -> list[EndpointState]:
    """The endpoints holding ``model`` in the best tier any of them has; [] when none holds it."""
    for tier in _RESIDENT_TIERS:
        holders = [ep for ep in usable if ep.models.get(model) is tier]
        if holders:
            return holders
    return []


def _cold_candidates(usable: list[EndpointState], model: str,
                     busy: set[str]) -> tuple[list[EndpointState], bool]:
    """Where a cold model should load: the first non-empty of (no eviction needed, idle evictable
    bytes suffice, everyone), leaving out endpoints in ``busy`` (claimed for another model) from the
    first two; and whether that narrowed ``usable``."""
    sizes = [ep.model_bytes[model] for ep in usable if model in ep.model_bytes]
    need = max(sizes) if sizes else None
    free = [ep for ep in usable if ep.url not in busy and _loads_without_eviction(ep, need)]
    if free:
        return free, len(free) < len(usable)
    evictable = [ep for ep in usable if ep.url not in busy and _loads_by_evicting_idle(ep, need)]
    if evictable:
        return evictable, len(evictable) < len(usable)
    return usable, False


def _loads_without_eviction(ep: EndpointState, need: int | None) -> bool:
    if ep.max_loaded_models is not None and ep.loaded_models >= ep.max_loaded_models:
        return False  # every maxLoadedModels slot is held (loaded, loading or evicting models)
    if not ep.loading and not any(tier is Tier.DEVICE for tier in ep.models.values()):
        return True
    return need is not None and ep.free_bytes is not None and ep.free_bytes >= need


def _loads_by_evicting_idle(ep: EndpointState, need: int | None) -> bool:
    if ep.evictable_bytes is None:
        return False
    if need is None:
        return ep.evictable_bytes > 0
    return (ep.free_bytes or 0) + ep.evictable_bytes >= need
