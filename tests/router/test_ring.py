"""The consistent-hash ring: keys stay put when endpoints come and go, and spread evenly."""

from __future__ import annotations

import collections
import hashlib

import pytest
from kubeinfer_router.ring import HashRing, bounded_assignment, hash64

NODES = [f"http://10.0.0.{i}:8000" for i in range(1, 11)]
KEYS = [f"tenant-{i}/prompt prefix {i * 7919}" for i in range(20_000)]


def owners(ring: HashRing) -> dict[str, str | None]:
    return {key: ring.lookup(key) for key in KEYS}


def test_hash_is_blake2b_64_big_endian():
    """Every router replica (and any other implementation) must agree on positions."""
    expected = int.from_bytes(hashlib.blake2b(b"abc", digest_size=8).digest(), "big")
    assert hash64("abc") == expected


def test_a_joining_endpoint_takes_about_one_nth_of_the_keys_and_nothing_else_moves():
    ring = HashRing(NODES)
    before = owners(ring)
    newcomer = "http://10.0.0.99:8000"
    ring.add(newcomer)
    after = owners(ring)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == newcomer for key in moved)
    assert len(moved) / len(KEYS) == pytest.approx(1 / 11, abs=0.03)


def test_a_leaving_endpoint_gives_away_only_its_own_keys():
    ring = HashRing(NODES)
    before = owners(ring)
    leaving = NODES[3]
    ring.remove(leaving)
    after = owners(ring)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == leaving}
    assert len(moved) / len(KEYS) == pytest.approx(1 / 10, abs=0.03)
    assert leaving not in set(after.values())


def test_keys_spread_evenly_over_endpoints():
    counts: dict[str | None, int] = {}
    for owner in owners(HashRing(NODES)).values():
        counts[owner] = counts.get(owner, 0) + 1
    assert set(counts) == set(NODES)
    share = len(KEYS) / len(NODES)
    assert all(0.7 * share <= count <= 1.3 * share for count in counts.values()), counts


def test_owners_do_not_depend_on_insertion_order_or_incremental_adds():
    forward = HashRing(NODES)
    incremental = HashRing()
    for node in reversed(NODES):
        incremental.add(node)
    assert owners(forward) == owners(incremental)


def test_walk_yields_every_endpoint_once_starting_with_the_owner():
    ring = HashRing(NODES, virtual_nodes=16)
    for key in KEYS[:200]:
        walk = list(ring.walk(key))
        assert walk[0] == ring.lookup(key)
        assert sorted(walk) == sorted(NODES)


def test_add_and_remove_are_idempotent_and_empty_ring_owns_nothing():
    ring = HashRing(virtual_nodes=8)
    assert ring.lookup("x") is None and list(ring.walk("x")) == []
    ring.add("a")
    ring.add("a")
    assert len(ring) == 1 and ring.nodes == {"a"} and "a" in ring
    assert ring.lookup("x") == "a"
    ring.remove("a")
    ring.remove("a")
    assert len(ring) == 0 and ring.lookup("x") is None


def test_virtual_nodes_must_be_positive():
    with pytest.raises(ValueError, match="virtual_nodes"):
        HashRing(NODES, virtual_nodes=0)


def test_bounded_assignment_gives_each_node_at_most_its_share_and_every_process_the_same_answer():
    models = [f"model-{i}" for i in range(7)]
    placed = bounded_assignment(HashRing(NODES[:3]), models)
    assert set(placed) == set(models)
    assert max(collections.Counter(placed.values()).values()) <= 3  # ceil(7 / 3)
    # another process (another router replica) building its own ring from the same sets agrees
    assert bounded_assignment(HashRing(reversed(NODES[:3])), reversed(models)) == placed


def test_bounded_assignment_of_as_many_keys_as_nodes_is_one_each_where_the_ring_alone_doubles_up():
    doubled = 0
    for fleet in range(30):
        nodes = [f"http://10.{fleet}.0.{i}:8000" for i in range(3)]
        keys = ["tiny-a", "tiny-b", "tiny-c"]
        assert sorted(bounded_assignment(HashRing(nodes), keys).values()) == sorted(nodes)
        ring = HashRing(nodes)
        doubled += len({ring.lookup(k) for k in keys}) < 3
    assert doubled >= 10  # control: the plain ring puts two of three keys on one node in most fleets


def test_bounded_assignment_moves_few_keys_when_a_node_leaves():
    keys = [f"model-{i}" for i in range(300)]
    ring = HashRing(NODES)
    before = bounded_assignment(ring, keys)
    ring.remove(NODES[0])
    after = bounded_assignment(ring, keys)
    moved = sum(before[k] != after[k] for k in keys)
    assert moved < 0.25 * len(keys)  # the leaver's 30 keys plus some knock-on, far from a reshuffle
    assert bounded_assignment(HashRing(), keys) == {} and bounded_assignment(ring, []) == {}
