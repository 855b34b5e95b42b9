"""The picker's steps, each on its own: filter, residency, urgent, imbalance gate, CHWBL, cold.

Load is simulated the way the proxy produces it: ``pick`` then ``EndpointTable.begin`` for each
request, ``EndpointTable.end`` when it finishes.
"""

from __future__ import annotations

import math
import random

import pytest
from kubeinfer_router.keys import RoutingKey
from kubeinfer_router.picker import REASONS, Decision, Picker
from kubeinfer_router.state import EndpointTable, Tier

NO_GATE = 10**9  # imbalance_min_requests that never fires, to look at CHWBL alone


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fleet(n: int, models: dict[str, Tier] | None = None) -> EndpointTable:
    table = EndpointTable(clock=Clock())
    table.sync({f"http://10.0.0.{i}:8000": (f"pod-{i}", True) for i in range(n)})
    for ep in table.all():
        ep.models = dict(models or {})
    return table


def key(model: str | None = "m", affinity: str = "") -> RoutingKey:
    return RoutingKey(model=model, adapter=None, affinity=affinity)


def send(picker: Picker, table: EndpointTable, k: RoutingKey, priority: int = 0) -> Decision:
    decision = picker.pick(table.all(), k, priority)
    assert decision is not None and decision.reason in REASONS
    table.begin(decision.endpoint.url)
    return decision


def bound(table: EndpointTable, load_factor: float) -> int:
    loads = [ep.inflight for ep in table.all()]
    return math.ceil(sum(loads) / len(loads) * load_factor)


# --- 1. filter ------------------------------------------------------------------------------------

def test_unready_draining_ejected_and_excluded_endpoints_are_never_picked():
    table = fleet(5, {"m": Tier.DEVICE})
    eps = table.all()
    eps[0].ready = False
    eps[1].draining = True
    eps[2].ejected_until = 100.5  # the clock says 100.0
    picker = Picker(clock=Clock())
    seen = {picker.pick(eps, key(affinity=f"p{i}"), exclude=frozenset({eps[3].url})).endpoint.url
            for i in range(50)}
    assert seen == {eps[4].url}
    assert picker.pick(eps, key(), exclude=frozenset({eps[3].url, eps[4].url})) is None
    assert picker.pick([], key()) is None


def test_one_usable_endpoint_is_only_and_no_model_is_any_least_loaded():
    table = fleet(3)
    picker = Picker()
    a, b, c = table.all()
    a.inflight, b.inflight, c.inflight = 4, 1, 3
    assert picker.pick(table.all(), key(model=None)) == Decision(b, "any")
    assert picker.pick([c], key()) == Decision(c, "only")


# --- 2. residency ---------------------------------------------------------------------------------

def test_tier_preference_device_then_host_then_disk_then_cold():
    table = fleet(4)
    by_tier = dict(zip((Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.ABSENT), table.all(), strict=True))
    for tier, ep in by_tier.items():
        ep.models = {"m": tier}
    picker = Picker(cold_claim_seconds=0)
    for tier in (Tier.DEVICE, Tier.HOST, Tier.DISK):
        picks = {picker.pick(table.all(), key(affinity=f"prompt {i}")).endpoint for i in range(40)}
        assert picks == {by_tier[tier]}
        by_tier[tier].ready = False
    decision = picker.pick(table.all(), key())
    assert decision.endpoint is by_tier[Tier.ABSENT] and decision.reason == "only"
    by_tier[Tier.DEVICE].ready = True
    by_tier[Tier.DEVICE].models = {"other": Tier.DEVICE}
    assert picker.pick(table.all(), key()).reason in ("cold_hash", "cold_memory")


def test_the_device_holder_keeps_a_model_under_moderate_load():
    """Spilling a model to a replica that must load it costs a load; below the gate it waits."""
    table = fleet(3)
    holder, other, third = table.all()
    holder.models = {"m": Tier.DEVICE}
    other.models = {"m": Tier.HOST}
    picker = Picker()
    decisions = [send(picker, table, key(affinity=f"p{i}")) for i in range(60)]
    assert {d.endpoint for d in decisions} == {holder}
    assert {d.reason for d in decisions} == {"hash"}


# --- 3. urgent ------------------------------------------------------------------------------------

def test_urgent_requests_go_to_the_lowest_ttfb_ema_among_holders():
    table = fleet(4, {"m": Tier.DEVICE})
    a, b, c, d = table.all()
    a.ttfb_ema, b.ttfb_ema, c.ttfb_ema = 0.5, 0.08, None
    d.models, d.ttfb_ema = {}, 0.01  # fastest, but does not hold the model
    picker = Picker()
    for i in range(20):
        assert picker.pick(table.all(), key(affinity=f"p{i}"), priority=-1) == Decision(b, "urgent")
    assert picker.pick(table.all(), key(), priority=0).reason in ("hash", "hash_spill")


def test_urgent_with_unknown_latencies_goes_to_the_least_loaded():
    table = fleet(3, {"m": Tier.DEVICE})
    a, b, c = table.all()
    a.inflight, b.inflight, c.inflight = 5, 2, 7
    assert Picker().pick(table.all(), key(), priority=-5) == Decision(b, "urgent")


# --- 4. imbalance gate ----------------------------------------------------------------------------

@pytest.mark.parametrize("loads, gated", [
    ((100, 50, 10), True),  # busiest > 64 and > 1.5 x least
    ((60, 0, 0), False),  # busiest not above the absolute threshold
    ((100, 90, 80), False),  # above 64 but within 1.5 x
    ((65, 43, 43), True),
])
def test_the_gate_sends_to_the_least_loaded_holder_only_when_both_thresholds_hold(loads, gated):
    table = fleet(3, {"m": Tier.DEVICE})
    for ep, load in zip(table.all(), loads, strict=True):
        ep.inflight = load
    least = min(table.all(), key=lambda ep: ep.inflight)
    picker = Picker(load_factor=100.0)  # CHWBL alone would take the ring's first choice
    decisions = [picker.pick(table.all(), key(affinity=f"p{i}")) for i in range(30)]
    if gated:
        assert all(d == Decision(least, "imbalance") for d in decisions)
    else:
        assert all(d.reason in ("hash", "hash_spill") for d in decisions)
        assert len({d.endpoint.url for d in decisions}) > 1


def test_the_gate_counts_load_the_pods_report_from_other_routers():
    table = fleet(2, {"m": Tier.DEVICE})
    busy, idle = table.all()
    busy.queue_length, busy.running = 80, 20  # requests from another router replica
    picker = Picker(load_factor=100.0)
    assert all(picker.pick(table.all(), key(affinity=f"p{i}")) == Decision(idle, "imbalance")
               for i in range(20))


def test_a_hot_model_spreads_past_its_busy_holder_only_beyond_the_gate():
    table = fleet(3)
    holder, idle, busier = table.all()
    holder.models = {"m": Tier.DEVICE}
    busier.inflight = 30
    picker = Picker()
    holder.inflight = 64
    assert picker.pick(table.all(), key()) == Decision(holder, "hash")
    holder.inflight = 65
    assert picker.pick(table.all(), key()) == Decision(idle, "imbalance")


# --- 5. affinity, then CHWBL ---------------------------------------------------------------------

def test_same_affinity_sticks_and_different_affinities_spread():
    table = fleet(4, {"m": Tier.DEVICE})
    picker = Picker()
    for i in range(20):
        first = picker.pick(table.all(), key(affinity=f"session-{i}"))
        assert first.reason in ("hash", "hash_spill")  # a new key: the ring, under the key bound
        again = [picker.pick(table.all(), key(affinity=f"session-{i}")) for _ in range(5)]
        assert all(d.endpoint is first.endpoint and d.reason == "affinity" for d in again)
    spread = {picker.pick(table.all(), key(affinity=f"session-{i}")).endpoint.url for i in range(40)}
    assert len(spread) == 4


def test_a_first_choice_over_the_bound_spills_to_the_next_on_the_ring_and_the_key_stays_with_its_holders():
    table = fleet(4, {"m": Tier.DEVICE})
    picker = Picker()
    first = picker.pick(table.all(), key(affinity="hot"))
    assert first.reason == "hash"
    ring_order = list(picker._ring({ep.url for ep in table.all()}).walk("m\x00\x00hot"))
    assert ring_order[0] == first.endpoint.url
    first.endpoint.inflight = 3  # mean = 4/4, bound ceil(1.25) = 2: 3 + 1 is over it
    spilled = picker.pick(table.all(), key(affinity="hot"))
    assert spilled.reason == "hash_spill" and spilled.endpoint.url == ring_order[1]
    # the second holder busy, the first free again: back to the first holder, not on to a third endpoint
    first.endpoint.inflight, spilled.endpoint.inflight = 0, 3
    back = picker.pick(table.all(), key(affinity="hot"))
    assert back.reason == "affinity" and back.endpoint is first.endpoint
    # both holders over the bound: the ring's next endpoint after them
    first.endpoint.inflight = 3  # mean = 7/4, bound ceil(2.19) = 3
    third = picker.pick(table.all(), key(affinity="hot"))
    assert third.reason == "hash_spill" and third.endpoint.url == ring_order[2]


def test_a_key_goes_back_to_its_first_holder_and_is_forgotten_after_the_ttl():
    clock = Clock()
    table = fleet(3, {"m": Tier.DEVICE})
    picker = Picker(clock=clock, affinity_ttl_seconds=60.0)
    first = picker.pick(table.all(), key(affinity="tenant"))
    first.endpoint.inflight = 5  # mean 2, bound 3: spill
    spilled = picker.pick(table.all(), key(affinity="tenant"))
    assert spilled.reason == "hash_spill"
    clock.now += 30.0
    assert picker.pick(table.all(), key(affinity="tenant")) == Decision(spilled.endpoint, "affinity")  # first busy
    first.endpoint.inflight = 0
    clock.now += 29.0  # the first holder was last used 59 s ago: still remembered, and first in line
    assert picker.pick(table.all(), key(affinity="tenant")) == Decision(first.endpoint, "affinity")
    clock.now += 61.0  # past the TTL of every holder: the ring decides again
    assert picker.pick(table.all(), key(affinity="tenant")) == Decision(first.endpoint, "hash")


def keys_owned_by(picker: Picker, table: EndpointTable, url: str, count: int) -> list[RoutingKey]:
    """``count`` keys whose ring's first choice is ``url`` (a fleet of few big prefix groups the ring
    happens to stack on one endpoint)."""
    ring = picker._ring({ep.url for ep in table.all()})
    found = [f"group {i}" for i in range(10_000) if ring.lookup(f"m\x00\x00group {i}") == url]
    return [key(affinity=a) for a in found[:count]]


def test_new_keys_spread_under_the_key_bound_even_when_the_ring_stacks_them_on_one_endpoint():
    table = fleet(3, {"m": Tier.DEVICE})
    picker = Picker(imbalance_min_requests=NO_GATE)
    groups = keys_owned_by(picker, table, table.all()[0].url, 8)
    placed = {}
    for k in groups:  # one request per group at a time (no in-flight load at all)
        placed[k] = picker.pick(table.all(), k).endpoint
    per_endpoint = [sum(1 for ep in placed.values() if ep is e) for e in table.all()]
    assert sorted(per_endpoint) == [2, 3, 3], per_endpoint  # the strict key bound: as even as 8 / 3 gets
    for k, ep in placed.items():  # and every group stays where it was placed
        assert picker.pick(table.all(), k) == Decision(ep, "affinity")


def test_without_the_memory_the_ring_alone_stacks_those_keys_on_one_endpoint():
    """The control for the test above: the ring's skew is real, the key bound is what spreads it."""
    table = fleet(3, {"m": Tier.DEVICE})
    picker = Picker(imbalance_min_requests=NO_GATE)
    groups = keys_owned_by(picker, table, table.all()[0].url, 8)
    assert {picker._bounded_walk(table.all(), "m\x00\x00" + k.affinity)[0].url for k in groups} == {
        table.all()[0].url}


def skewed_stream(rng: random.Random, n: int) -> list[RoutingKey]:
    """80% of requests share one prompt prefix (a hot tenant), the rest are unique."""
    return [key(affinity="hot system prompt" if rng.random() < 0.8 else f"cold {i}") for i in range(n)]


@pytest.mark.parametrize("load_factor", [1.25, 1.5])
def test_no_endpoint_exceeds_the_bound_under_a_skewed_stream(load_factor):
    table = fleet(8, {"m": Tier.DEVICE})
    picker = Picker(load_factor=load_factor, imbalance_min_requests=NO_GATE)
    rng = random.Random(3)
    for k in skewed_stream(rng, 400):  # all stay in flight
        send(picker, table, k)
        assert max(ep.inflight for ep in table.all()) <= bound(table, load_factor)
    for k in skewed_stream(rng, 2000):  # requests finish at random
        loads_before = {ep.url: ep.inflight for ep in table.all()}
        total = sum(loads_before.values())
        decision = send(picker, table, k)
        assert decision.endpoint.inflight <= math.ceil((total + 1) / 8 * load_factor)
        busy = [ep for ep in table.all() if ep.inflight]
        for ep in rng.sample(busy, k=min(len(busy), rng.choice((0, 1, 2)))):
            table.end(ep.url, None)


def test_without_a_bound_the_same_stream_piles_onto_one_endpoint():
    """The control for the test above: the skew is real, the bound is what holds it."""
    table = fleet(8, {"m": Tier.DEVICE})
    picker = Picker(load_factor=1000.0, imbalance_min_requests=NO_GATE)
    for k in skewed_stream(random.Random(3), 400):
        send(picker, table, k)
    assert max(ep.inflight for ep in table.all()) > 2 * bound(table, 1.25)


# --- 6. cold --------------------------------------------------------------------------------------

def test_a_cold_model_settles_on_one_endpoint_whatever_the_prompts_while_load_is_low():
    table = fleet(4)
    picker = Picker(cold_claim_seconds=0)  # the ring alone, no claims
    urls = set()
    for i in range(40):
        decision = send(picker, table, key(affinity=f"a different prompt {i}"))
        assert decision.reason == "cold_hash"
        urls.add(decision.endpoint.url)
        table.end(decision.endpoint.url, 0.1)
    assert len(urls) == 1
    # control: once resident everywhere, the same prompts spread over the replicas
    for ep in table.all():
        ep.models = {"m": Tier.DEVICE}
    assert len({picker.pick(table.all(), key(affinity=f"a different prompt {i}")).endpoint.url
                for i in range(40)}) >= 3


def test_a_burst_for_a_cold_model_loads_it_on_one_endpoint():
    clock = Clock()
    table = fleet(4, {"m": Tier.ABSENT})  # in every pod's catalogue, loaded nowhere
    picker = Picker(clock=clock)
    burst = [send(picker, table, key(affinity=f"prompt {i}")) for i in range(12)]  # all in flight
    assert len({d.endpoint.url for d in burst}) == 1
    assert {d.reason for d in burst} == {"cold_hash"}
    # without claims the bound scatters the same burst over several replicas (several loads)
    scattered = fleet(4, {"m": Tier.ABSENT})
    no_claims = Picker(cold_claim_seconds=0)
    assert len({send(no_claims, scattered, key(affinity=f"prompt {i}")).endpoint.url
                for i in range(12)}) > 1


def test_a_claim_lapses_after_cold_claim_seconds():
    clock = Clock()
    table = fleet(4, {"x": Tier.ABSENT})
    picker = Picker(clock=clock, cold_claim_seconds=5.0)
    claimed = send(picker, table, key(model="x")).endpoint
    table.end(claimed.url, 0.5)
    claimed.models = {"x": Tier.DEVICE}  # loaded (its report says so): no longer cold
    assert picker.pick(table.all(), key(model="y")).endpoint is not claimed
    claimed.models = {"x": Tier.ABSENT}  # evicted again while the claim still runs
    while_claimed = {picker.pick(table.all(), key(model=f"z{i}")).endpoint.url for i in range(30)}
    assert claimed.url not in while_claimed  # kept free for x
    clock.now += 5.0
    after = {picker.pick(table.all(), key(model=f"z{i}")).endpoint.url for i in range(30)}
    assert claimed.url in after  # the claim on x no longer keeps other models away


def test_a_model_no_catalogue_lists_claims_nothing():
    table = fleet(4, {"known": Tier.ABSENT})
    picker = Picker(clock=Clock())
    typo = send(picker, table, key(model="gtp-4")).endpoint
    assert len({send(picker, table, key(model="gtp-4")).endpoint.url for _ in range(12)}) > 1
    typo_free = [picker.pick(table.all(), key(model="known", affinity=str(i))) for i in range(3)]
    assert typo in table.all() and all(d.reason == "cold_hash" for d in typo_free)


def test_different_cold_models_go_to_empty_replicas_first():
    table = fleet(3)
    picker = Picker(cold_claim_seconds=0)
    placed = {}
    for model in ("alpha", "beta", "gamma"):
        decision = send(picker, table, key(model=model))
        table.apply_resident_header(decision.endpoint.url, model, model)
        table.end(decision.endpoint.url, 0.2)
        placed[model] = decision
    assert len({d.endpoint.url for d in placed.values()}) == 3
    assert placed["alpha"].reason == "cold_hash"
    assert placed["beta"].reason == placed["gamma"].reason == "cold_memory"
    for model, decision in placed.items():  # afterwards every model goes to its own replica
        assert picker.pick(table.all(), key(model=model, affinity="anything")) == Decision(decision.endpoint, "hash")


def test_cold_picks_prefer_free_memory_then_idle_evictable_bytes():
    table = fleet(3)
    full, roomy, evictable = table.all()
    for ep in table.all():
        ep.models = {"resident": Tier.DEVICE}
        ep.free_bytes, ep.evictable_bytes = 0, 0
    roomy.free_bytes = 500
    evictable.evictable_bytes = 900
    full.model_bytes = {"new": 400}  # one pod's catalogue says how big the model is
    picker = Picker(cold_claim_seconds=0)
    assert picker.pick(table.all(), key(model="new")) == Decision(roomy, "cold_memory")
    roomy.free_bytes = 100
    assert picker.pick(table.all(), key(model="new")) == Decision(evictable, "cold_memory")
    evictable.evictable_bytes = 0
    assert picker.pick(table.all(), key(model="new")).reason == "cold_hash"


def test_router_replicas_deciding_at_once_put_different_cold_models_on_different_pods():
    """Issue 18's e2e: 2 router replicas, 3 pods, 3 models, maxLoadedModels 1. Each replica knows
    only its own claims; the models' homes keep them apart anyway."""
    for fleet_id in range(20):
        urls = {f"http://10.{fleet_id}.0.{i}:8000": (f"pod-{i}", True) for i in range(3)}
        tables = [EndpointTable(clock=Clock()), EndpointTable(clock=Clock())]
        for table in tables:
            table.sync(urls)
            for ep in table.all():
                ep.models = {m: Tier.ABSENT for m in ("tiny-a", "tiny-b", "tiny-c")}
                ep.max_loaded_models = 1
        pickers = [Picker(clock=Clock()), Picker(clock=Clock())]
        # replica 0 gets tiny-a and tiny-b, replica 1 tiny-c, before any pod reports a load
        placed = {model: send(pickers[r], tables[r], key(model=model)).endpoint.url
                  for r, model in ((0, "tiny-a"), (0, "tiny-b"), (1, "tiny-c"))}
        assert len(set(placed.values())) == 3, (fleet_id, placed)
        # and replica 1, asked for tiny-a later, sends it where replica 0 did
        assert send(pickers[1], tables[1], key(model="tiny-a")).endpoint.url == placed["tiny-a"]


def test_a_load_another_replica_started_makes_its_pod_the_holder():
    table = fleet(3, {"m": Tier.ABSENT, "other": Tier.ABSENT})
    a, b, c = table.all()
    home = Picker(clock=Clock()).pick(table.all(), key()).endpoint
    loader = next(ep for ep in (a, b, c) if ep is not home)
    loader.loading = frozenset({"m"})  # its report: m is loading (another router sent it there)
    picker = Picker(clock=Clock())
    assert {send(picker, table, key(affinity=str(i))).endpoint.url for i in range(6)} == {loader.url}


def test_a_pod_whose_model_slots_are_all_held_is_not_free():
    table = fleet(2, {"m": Tier.ABSENT, "other": Tier.ABSENT})
    a, b = table.all()
    for ep in (a, b):
        ep.max_loaded_models = 1
    home = Picker(cold_claim_seconds=0).pick(table.all(), key()).endpoint
    home.loaded_models, home.loading = 1, frozenset({"other"})  # loading another model in its one slot
    other = b if home is a else a
    assert Picker(cold_claim_seconds=0).pick(table.all(), key()) == Decision(other, "cold_memory")
    home.loading, home.loaded_models, home.max_loaded_models = frozenset(), 1, 2  # a slot is still free
    assert Picker(cold_claim_seconds=0).pick(table.all(), key()) == Decision(home, "cold_hash")


def test_urgent_cold_requests_still_go_to_the_fastest():
    table = fleet(3)
    a, b, c = table.all()
    a.ttfb_ema, b.ttfb_ema, c.ttfb_ema = 0.3, 0.2, 0.1
    assert Picker().pick(table.all(), key(), priority=-1) == Decision(c, "urgent")


@pytest.mark.parametrize("kwargs", [{"load_factor": 0.9}, {"virtual_nodes": 0}, {"imbalance_ratio": 0.5},
                                    {"imbalance_min_requests": -1}, {"cold_claim_seconds": -1},
                                    {"key_load_factor": 0.9}, {"affinity_ttl_seconds": 0}, {"affinity_keys": 0}])
def test_bad_picker_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Picker(**kwargs)
