"""Which endpoints recently served each routing key: the router's picture of the pods' prefix caches.

A serving pod keeps the KV blocks of a prompt's prefix after the request ends (its prefix cache,
evicted least-recently-used first), so the pod that served a key last is the one most likely to
still hold that key's prefix. The picker therefore remembers, per routing key, the endpoints it sent
the key to and when; it prefers them (within the load bound) over the ring's first choice, which a
spill under load may have bypassed. This is the approximate prefix index of llm-d's prefix-cache
scorer (``pkg/epp/scheduling/framework/plugins/multi/prefix`` in
kubernetes-sigs/gateway-api-inference-extension: an LRU of block hashes per server, filled from
the scheduler's own decisions) and of SGLang's cache-aware router (a radix tree per worker, filled
from the requests it routes), kept at the granularity of the router's key (model, adapter, session
or the prompt's first characters) instead of blocks.

The memory also counts how many distinct keys each endpoint holds, so a key seen for the first time
can be placed with a bound on key counts too (consistent hashing with bounded loads applied to keys,
as in Mirrokni et al.'s original formulation), which spreads a few large prefix groups evenly over
the replicas instead of letting the ring put half of them on one.

What it cannot know: a pod that evicted a prefix to make room (the next request there misses
once and refreshes the entry), or a pod's cache emptied by a restart or a model reload (entries
expire after ``ttl_seconds``). Key counts are approximate in the same way (an expired holder of a
key still in use counts until the key is next looked up or ages out). Pure logic, one asyncio
loop, no locks.
"""

from __future__ import annotations

from collections import OrderedDict

#: Default seconds a remembered (key, endpoint) pair stays valid without a new request.
DEFAULT_TTL_SECONDS = 300.0
#: Default most keys remembered (least recently used forgotten first): a few MiB of memory.
DEFAULT_MAX_KEYS = 16_384
#: Most endpoints remembered per key (a new one replaces the least recently used).
MAX_HOLDERS_PER_KEY = 4


class AffinityMemory:
    """Routing key -> the endpoints it was sent to recently, first holder first; keys per endpoint.

    Args:
        ttl_seconds: how long a (key, endpoint) pair counts without another request of the key to
            that endpoint (seconds, > 0).
        max_keys: most keys kept (>= 1); the least recently used key is forgotten first.

    Raises:
        ValueError: a parameter is out of its range.
    """

    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.ttl_seconds = ttl_seconds
        self.max_keys = max_keys
        # key -> {endpoint URL: monotonic time of its last request of the key}, in the order the
        # endpoints became holders; keys in least-recently-used order
        self._keys: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def holders(self, key: str, now: float) -> list[str]:
        """The endpoints ``key`` was sent to within ``ttl_seconds`` before ``now``, the one it was placed
        on first leading (later holders took its overflow: preferring the first keeps one pod's copy
        of the prefix hot instead of spreading the key's traffic, and every pod's cache, over all)."""
        entry = self._keys.get(key)
        if entry is None:
            return []
        for url in [u for u, seen in entry.items() if now - seen > self.ttl_seconds]:
            self._drop(entry, url)
        if not entry:
            del self._keys[key]
            return []
        return list(entry)

    def keys_of(self, url: str) -> int:
        """How many remembered keys name ``url`` as a holder (approximate; see the module docstring)."""
        return self._counts.get(url, 0)

    def record(self, key: str, url: str, now: float) -> None:
        """``key`` was just sent to ``url`` (at ``now``): a new holder joins after the key's others (the
        least recently used one leaves when the key has :data:`MAX_HOLDERS_PER_KEY`); a known one is
        refreshed in place."""
        self._expire(now)
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = {}
            if len(self._keys) > self.max_keys:
                self._forget_oldest()
        else:
            self._keys.move_to_end(key)
        if url not in entry:
            self._counts[url] = self._counts.get(url, 0) + 1
            if len(entry) >= MAX_HOLDERS_PER_KEY:
                self._drop(entry, min(entry, key=entry.__getitem__))
        entry[url] = now

    def _expire(self, now: float) -> None:
        """Forget keys whose most recent request is older than the TTL (they sit at the LRU end)."""
        while self._keys:
            key, entry = next(iter(self._keys.items()))
            if entry and now - max(entry.values()) <= self.ttl_seconds:
                return
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, entry = self._keys.popitem(last=False)
        for url in list(entry):
            self._drop(entry, url)

    def _drop(self, entry: dict[str, float], url: str) -> None:
        del entry[url]
        left = self._counts.get(url, 0) - 1
        if left > 0:
            self._counts[url] = left
        else:
            self._counts.pop(url, None)
