"""The affinity memory: which endpoints recently served each routing key, and how many keys each holds."""

from __future__ import annotations

import pytest
from kubeinfer_router.affinity import MAX_HOLDERS_PER_KEY, AffinityMemory


def test_holders_keep_the_order_they_joined_in_and_count_their_keys():
    memory = AffinityMemory(ttl_seconds=60.0)
    memory.record("k", "a", 0.0)
    memory.record("k", "b", 1.0)
    memory.record("k", "a", 2.0)  # refreshed in place: "a" still leads
    memory.record("j", "b", 3.0)
    assert memory.holders("k", 3.0) == ["a", "b"]
    assert memory.holders("j", 3.0) == ["b"]
    assert memory.holders("unknown", 3.0) == []
    assert (memory.keys_of("a"), memory.keys_of("b"), memory.keys_of("c")) == (1, 2, 0)


def test_a_holder_unused_for_the_ttl_is_dropped_and_uncounted():
    memory = AffinityMemory(ttl_seconds=60.0)
    memory.record("k", "a", 0.0)
    memory.record("k", "b", 30.0)
    assert memory.holders("k", 60.0) == ["a", "b"]
    assert memory.holders("k", 60.5) == ["b"]
    assert memory.keys_of("a") == 0
    assert memory.holders("k", 91.0) == [] and len(memory) == 0 and memory.keys_of("b") == 0


def test_keys_idle_past_the_ttl_are_forgotten_when_others_are_recorded():
    memory = AffinityMemory(ttl_seconds=10.0)
    for i in range(5):
        memory.record(f"old-{i}", "a", float(i))
    memory.record("new", "b", 100.0)
    assert len(memory) == 1 and memory.keys_of("a") == 0 and memory.keys_of("b") == 1


def test_the_least_recently_used_key_goes_first_beyond_max_keys():
    memory = AffinityMemory(max_keys=2)
    memory.record("k1", "a", 0.0)
    memory.record("k2", "a", 1.0)
    memory.record("k1", "b", 2.0)  # k1 used again: k2 is now the least recently used
    memory.record("k3", "c", 3.0)
    assert memory.holders("k2", 3.0) == [] and memory.holders("k1", 3.0) == ["a", "b"]
    assert (memory.keys_of("a"), memory.keys_of("b"), memory.keys_of("c")) == (1, 1, 1)


def test_a_key_keeps_at_most_max_holders_dropping_the_least_recently_used():
    memory = AffinityMemory()
    for i in range(MAX_HOLDERS_PER_KEY):
        memory.record("k", f"e{i}", float(i))
    memory.record("k", "e0", 10.0)  # e1 is now the least recently used holder
    memory.record("k", "new", 11.0)
    assert memory.holders("k", 11.0) == ["e0"] + [f"e{i}" for i in range(2, MAX_HOLDERS_PER_KEY)] + ["new"]
    assert memory.keys_of("e1") == 0


@pytest.mark.parametrize("kwargs", [{"ttl_seconds": 0}, {"max_keys": 0}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        AffinityMemory(**kwargs)
