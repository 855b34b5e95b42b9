"""Consistent-hash ring with virtual nodes: the stable part of the router's choice.

Each endpoint puts ``virtual_nodes`` points on a 64-bit ring; a key belongs to the first point
clockwise from its own hash. When an endpoint joins or leaves, only the keys between its points and
their predecessors move, about ``1/N`` of them (Karger et al., "Consistent hashing and random trees",
STOC 1997). :meth:`HashRing.walk` yields every endpoint once in clockwise order from a key, which is
what consistent hashing with bounded loads needs: take the first endpoint on the walk whose load is
under the bound (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018;
the same walk as KubeAI's ``PrefixHash`` balancer, ``internal/loadbalancer/balance_chwbl.go`` in
substratusai/kubeai, which uses xxhash64 and 256 replicas per endpoint).

The hash is ``hashlib.blake2b(digest_size=8)`` (standard library, stable across processes and
machines, unlike ``hash()``); virtual node ``i`` of endpoint ``u`` sits at ``hash64(f"{u}#{i}")``.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Iterator

DEFAULT_VIRTUAL_NODES = 256


def hash64(text: str) -> int:
    """The ring position of ``text``: blake2b with an 8-byte digest, as an unsigned 64-bit integer."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring of node names (endpoint URLs) with ``virtual_nodes`` points each.

    Args:
        nodes: the initial node names (duplicates are ignored).
        virtual_nodes: points per node on the ring (>= 1); more points spread keys more evenly
            (the share of each node deviates from ``1/N`` by about ``1/sqrt(virtual_nodes)``).

    Raises:
        ValueError: ``virtual_nodes`` < 1.
    """

    def __init__(self, nodes: Iterable[str] = (), virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self._nodes: set[str] = set()
        self._points: list[tuple[int, str]] = []  # sorted by (position, node)
        for node in nodes:
            if node not in self._nodes:
                self._nodes.add(node)
                self._points.extend(self._node_points(node))
        self._points.sort()

    @property
    def nodes(self) -> frozenset[str]:
        """The node names on the ring."""
        return frozenset(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def add(self, node: str) -> None:
        """Put ``node``'s virtual nodes on the ring (no-op when it is already there)."""
        if node in self._nodes:
            return
        self._nodes.add(node)
        self._points = sorted(self._points + self._node_points(node))

    def _node_points(self, node: str) -> list[tuple[int, str]]:
        return [(hash64(f"{node}#{i}"), node) for i in range(self.virtual_nodes)]

    def remove(self, node: str) -> None:
        """Take ``node``'s virtual nodes off the ring (no-op when it is not there)."""
        if node not in self._nodes:
            return
        self._nodes.discard(node)
        self._points = [p for p in self._points if p[1] != node]

    def walk(self, key: str) -> Iterator[str]:
        """Every node once, clockwise from ``key``'s position (the first one owns the key).

        Yields nothing on an empty ring.
        """
        points = self._points
        if not points:
            return
        start = bisect.bisect_left(points, (hash64(key), ""))
        seen: set[str] = set()
        count = len(points)
        for step in range(count):
            node = points[(start + step) % count][1]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == len(self._nodes):
                    return

    def lookup(self, key: str) -> str | None:
        """The node that owns ``key`` (first clockwise), or None on an empty ring."""
        return next(self.walk(key), None)


def bounded_assignment(ring: HashRing, keys: Iterable[str]) -> dict[str, str]:
    """Place every key of a known key set on the ring's nodes, no node taking more than its share.

    Consistent hashing with bounded loads (Mirrokni et al., SODA 2018) run over the whole key set at
    once with the strict bound ``ceil(len(keys) / len(nodes))``: keys are placed in the order of
    their own hash (:func:`hash64`, then the key), each on the first node of its clockwise walk that
    holds fewer than the bound. The result depends only on the key set and the node set, so every
    process computing it over the same sets gets the same placement without talking to the others
    (the router's replicas use it to put different cold models on different pods), and it keeps the
    ring's stability: a node joining or leaving moves few keys.

    Args:
        ring: the nodes (an empty ring gives ``{}``).
        keys: the key set (duplicates count once).

    Returns:
        key -> node, for every key.
    """
    unique = sorted(set(keys), key=lambda k: (hash64(k), k))
    if not unique or not len(ring):
        return {}
    cap = math.ceil(len(unique) / len(ring))
    counts: dict[str, int] = {}
    placed: dict[str, str] = {}
    for key in unique:
        for node in ring.walk(key):
            if counts.get(node, 0) < cap:
                counts[node] = counts.get(node, 0) + 1
                placed[key] = node
                break
    return placed
