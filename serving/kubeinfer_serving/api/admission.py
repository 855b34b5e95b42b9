"""Fair shares between tenants: per-tenant limits and weighted fair admission ahead of each engine.

The engine serves its waiting queue first come, first served, so a tenant that sends a thousand
requests at once would make everyone else wait behind all of them. :class:`FairAdmission` keeps
each model's engine supplied with at most ``capacity`` engine requests (its batch size plus a
little slack, so the batch never starves) and queues the rest per tenant. One tenant alone may
hold at most the batch size minus one reserved slot (``reserve``), so a request of another tenant
starts at once instead of waiting for a flood's requests to finish (at a cost of one slot of
batch for a single tenant: 1/256 with the default ``max_num_seqs``). When engine requests
finish, the freed room goes to the waiting tenant that has received the least service relative
to its weight: start-time fair queuing (Goyal, Vin and Cheng, SIGCOMM 1996) over jobs, where a
tenant that becomes active starts at the current minimum so idle time earns no credit. Within a
tenant, requests keep their order (lower ``priority`` value first, then arrival).

Per-tenant limits (:class:`~kubeinfer_serving.api.tenancy.Tenant`):

* ``max_waiting_requests``: requests of the tenant waiting for admission; one more gets 429
  ``tenant_queue_full``;
* ``tokens_per_second`` / ``burst_tokens``: a token bucket charged with each request's prompt
  tokens at admission and completion tokens at its end; while it is in debt, requests get 429
  ``rate_limit_exceeded`` with ``Retry-After`` = the seconds until it is out of debt.

Everything runs on the event loop (no locks); admission of a request that fits costs a few
dict operations and no await.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

from kubeinfer_serving import metrics
from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.tenancy import Tenant
from kubeinfer_serving.engine.validation import queue_full

#: Retry-After (seconds) suggested when a tenant's waiting cap is reached.
QUEUE_RETRY_AFTER = 1.0


class TokenBucket:
    """Tokens per second with a burst: refilled continuously, may go into debt by one request.

    Args:
        rate: tokens added per second (> 0).
        burst: bucket size in tokens (default 10 s of ``rate``).
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate * 10.0
        self.level = self.burst
        self._t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self._t) * self.rate)
        self._t = now

    def retry_after(self) -> float | None:
        """Seconds until the bucket is out of debt, or None when a request may start now."""
        self._refill()
        return None if self.level >= 0 else -self.level / self.rate

    def charge(self, tokens: int) -> None:
        """Take ``tokens`` (the level may go below zero)."""
        self._refill()
        self.level -= tokens


@dataclass(eq=False)
class _Waiter:
    tenant: str
    jobs: int
    priority: int
    seq: int
    future: asyncio.Future = field(repr=False)


class Ticket:
    """Room for ``jobs`` engine requests of ``tenant`` in one model's gate; :meth:`release` it as they end."""

    __slots__ = ("_gate", "tenant", "jobs", "_held")

    def __init__(self, gate: _Gate, tenant: str, jobs: int) -> None:
        self._gate = gate
        self.tenant = tenant
        self.jobs = jobs
        self._held = jobs

    def release(self, jobs: int | None = None) -> None:
        """Give back the room of ``jobs`` engine requests (None: all still held) and admit whoever is next.

        Releasing more than is held gives back what is held (so releasing twice is harmless).
        """
        n = self._held if jobs is None else min(jobs, self._held)
        if n > 0:
            self._held -= n
            self._gate.release(self.tenant, n)


class _Gate:
    """One model's admission state: jobs in flight (in all and per tenant) and the tenants' queues."""

    def __init__(self, capacity: int, tenant_cap: int, max_queued_jobs: int) -> None:
        self.capacity = capacity
        self.tenant_cap = tenant_cap
        self.max_queued_jobs = max_queued_jobs
        self.in_flight = 0
        self.tenant_in_flight: dict[str, int] = {}
        self.queued_jobs = 0
        self.queues: dict[str, list[_Waiter]] = {}
        self.start_tag: dict[str, float] = {}
        self._seq = itertools.count()

    def fits(self, tenant: str, jobs: int) -> bool:
        """Room for ``jobs`` more of ``tenant``: within the total and the tenant's cap (or the engine is idle)."""
        if self.in_flight == 0:
            return True
        mine = self.tenant_in_flight.get(tenant, 0)
        return self.in_flight + jobs <= self.capacity and (mine == 0 or mine + jobs <= self.tenant_cap)

    def take(self, tenant: str, jobs: int) -> None:
        self.in_flight += jobs
        self.tenant_in_flight[tenant] = self.tenant_in_flight.get(tenant, 0) + jobs

    def release(self, tenant: str, jobs: int) -> None:
        self.in_flight -= jobs
        self.tenant_in_flight[tenant] -= jobs
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while True:
            for queue in self.queues.values():
                while queue and queue[0].future.done():  # clients that left while waiting
                    self.queued_jobs -= queue.pop(0).jobs
            ready = [t for t, q in self.queues.items() if q and self.fits(t, q[0].jobs)]
            if not ready:
                return
            tenant = min(ready, key=lambda t: self.start_tag.get(t, 0.0))
            head = self.queues[tenant].pop(0)
            self.queued_jobs -= head.jobs
            self.take(tenant, head.jobs)
            head.future.set_result(None)


class FairAdmission:
    """Per-model gates and per-tenant buckets (one per app, ``app.state.admission``).

    Args:
        enabled: queue fairly across tenants; when False, :meth:`admit` only applies the tenant's
            token rate (the engine's FIFO and queue cap do the rest, as without tenants).
        slack: extra engine requests admitted beyond the batch size, as a fraction of it, so the
            engine has the next request at hand when one finishes.
        reserve: batch slots one tenant may not take, kept for the others.
    """

    def __init__(self, *, enabled: bool, slack: float = 0.125, reserve: int = 1) -> None:
        self.enabled = enabled
        self.slack = slack
        self.reserve = reserve
        self._gates: dict[str, _Gate] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._waiting: dict[str, int] = {}

    def _bucket(self, tenant: Tenant) -> TokenBucket | None:
        if tenant.tokens_per_second is None:
            return None
        bucket = self._buckets.get(tenant.name)
        if bucket is None:
            bucket = self._buckets[tenant.name] = TokenBucket(tenant.tokens_per_second, tenant.burst_tokens)
        return bucket

    def check_rate(self, tenant: Tenant) -> None:
        """Refuse the request when the tenant's token bucket is in debt.

        Raises:
            APIError: 429 ``rate_limit_exceeded`` with ``retry_after`` = seconds until out of debt.
        """
        bucket = self._bucket(tenant)
        wait = bucket.retry_after() if bucket is not None else None
        if wait is not None:
            metrics.TENANT_REQUESTS.labels(tenant=tenant.name, outcome="rate_limited").inc()
            raise APIError(429, f"Tenant {tenant.name!r} is over its limit of {tenant.tokens_per_second:g} tokens "
                           f"per second; retry in {math.ceil(wait)} s", code="rate_limit_exceeded",
                           retry_after=wait)

    def charge(self, tenant: Tenant, tokens: int, kind: str) -> None:
        """Count ``tokens`` served to ``tenant`` (``kind``: prompt or generation) against its rate."""
        if tokens <= 0:
            return
        metrics.TENANT_TOKENS.labels(tenant=tenant.name, kind=kind).inc(tokens)
        bucket = self._bucket(tenant)
        if bucket is not None:
            bucket.charge(tokens)

    def try_admit(self, model: str, capacity: int, max_queued_jobs: int, tenant: Tenant, jobs: int) -> Ticket | None:
        """Admit at once when nobody waits and there is room (no await); None when :meth:`admit` must queue.

        Raises:
            APIError: 429 ``rate_limit_exceeded``, as :meth:`admit`.
        """
        self.check_rate(tenant)
        gate = self._gate(model, capacity, max_queued_jobs)
        if not gate.queues.get(tenant.name) and gate.fits(tenant.name, jobs):
            gate.take(tenant.name, jobs)
            self._advance(gate, tenant, jobs)
            metrics.TENANT_REQUESTS.labels(tenant=tenant.name, outcome="admitted").inc()
            return Ticket(gate, tenant.name, jobs)
        return None

    def _gate(self, model: str, capacity: int, max_queued_jobs: int) -> _Gate:
        room = capacity + max(1, math.ceil(capacity * self.slack))
        tenant_cap = max(1, capacity - self.reserve) if capacity > 1 else 1
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = _Gate(room, tenant_cap, max_queued_jobs)
        gate.capacity, gate.tenant_cap, gate.max_queued_jobs = room, tenant_cap, max_queued_jobs
        return gate

    async def admit(self, model: str, capacity: int, max_queued_jobs: int, tenant: Tenant, jobs: int,
                    priority: int = 0) -> Ticket | None:
        """Wait for room for ``jobs`` engine requests of ``tenant`` on ``model``.

        Args:
            capacity: the engine's batch size (``max_num_seqs``); the gate admits that plus ``slack``.
            max_queued_jobs: most engine requests waiting in the gate over all tenants (the
                engine's ``max_waiting_requests``).

        Returns:
            the :class:`Ticket` to release when the jobs are done, or None when fair admission is off.

        Raises:
            APIError: 429 ``rate_limit_exceeded`` (token rate), ``tenant_queue_full`` (the tenant's
                ``max_waiting_requests``), with ``retry_after``.
            QueueFullError: the model's queue is full (answered 429 ``queue_full``; the one error of
                :func:`~kubeinfer_serving.engine.validation.queue_full`).
        """
        self.check_rate(tenant)
        if not self.enabled:
            metrics.TENANT_REQUESTS.labels(tenant=tenant.name, outcome="admitted").inc()
            return None
        gate = self._gate(model, capacity, max_queued_jobs)
        queue = gate.queues.setdefault(tenant.name, [])
        if not queue and gate.fits(tenant.name, jobs):
            gate.take(tenant.name, jobs)
            self._advance(gate, tenant, jobs)
            metrics.TENANT_REQUESTS.labels(tenant=tenant.name, outcome="admitted").inc()
            return Ticket(gate, tenant.name, jobs)
        waiting = self._waiting.get(tenant.name, 0)
        if tenant.max_waiting_requests is not None and waiting >= tenant.max_waiting_requests:
            metrics.TENANT_REQUESTS.labels(tenant=tenant.name, outcome="queue_full").inc()
            raise APIError(429, f"Tenant {tenant.name!r} has {waiting} requests waiting (its limit); retry later",
                           code="tenant_queue_full", retry_after=QUEUE_RETRY_AFTER)
        if gate.queued_jobs + jobs > max_queued_jobs:
            metrics.TENANT_REQUESTS.labels(tenant=tenant.name, outcome="queue_full").inc()
            raise queue_full(model)
        if not queue:  # becoming active: start at the current minimum, so idle time earns no credit
            active = [gate.start_tag.get(t, 0.0) for t, q in gate.queues.items() if q]
            floor = min(active) if active else max(gate.start_tag.values(), default=0.0)
            gate.start_tag[tenant.name] = max(gate.start_tag.get(tenant.name, 0.0), floor)
        waiter = _Waiter(tenant.name, jobs, priority, next(gate._seq), asyncio.get_running_loop().create_future())
        _insert(queue, waiter)
        gate.queued_jobs += jobs
        self._waiting[tenant.name] = waiting + 1
        metrics.TENANT_WAITING.labels(tenant=tenant.name).set(waiting + 1)
        try:
            gate._admit_waiters()
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                gate.release(tenant.name, jobs)  # admitted, but the client left at the same moment
            else:
                waiter.future.cancel()
                if waiter in queue:
                    queue.remove(waiter)
                    gate.queued_jobs -= jobs
                gate._admit_waiters()
            raise
        finally:
            self._waiting[tenant.name] -= 1
            metrics.TENANT_WAITING.labels(tenant=tenant.name).set(self._waiting[tenant.name])
        self._advance(gate, tenant, jobs)
        metrics.TENANT_REQUESTS.labels(tenant=tenant.name, outcome="admitted").inc()
        return Ticket(gate, tenant.name, jobs)

    @staticmethod
    def _advance(gate: _Gate, tenant: Tenant, jobs: int) -> None:
        gate.start_tag[tenant.name] = gate.start_tag.get(tenant.name, 0.0) + jobs / tenant.weight


def _insert(queue: list[_Waiter], waiter: _Waiter) -> None:
    """Insert by (priority, arrival): lower priority values first, as vLLM orders them."""
    i = len(queue)
    while i > 0 and queue[i - 1].priority > waiter.priority:
        i -= 1
    queue.insert(i, waiter)
