"""The endpoint table: discovery sync, load reports, resident headers, in-flight counts and TTFB EMA."""

from __future__ import annotations

import pytest
from kubeinfer_router.state import EndpointTable, Tier

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"

REPORT = {
    "queue_length": 3, "running": 5, "kv_cache_usage": 0.42, "draining": False, "warm_tier": True,
    "memory": {"budget_bytes": 1000, "used_bytes": 600, "evictable_bytes": 200, "max_loaded_models": 3,
               "loaded_models": 2},
    "models": [
        {"id": "tiny-llama", "kind": "generate", "state": "loaded", "tier": "device", "parent": None,
         "queue_length": 1, "running": 2, "bytes": 400},
        {"id": "qwen", "kind": "generate", "state": "unloaded", "tier": "host", "parent": None},
        {"id": "bert", "kind": "embed", "state": "unloaded", "tier": "disk"},
        {"id": "llama-70b", "kind": "generate", "state": "loading", "tier": "absent"},
        {"id": "tiny-llama-sql", "kind": "generate", "state": "loaded", "parent": "tiny-llama"},
    ],
}


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def table_with(*urls: str, clock: Clock | None = None) -> EndpointTable:
    table = EndpointTable(clock=clock or Clock())
    table.sync({url: (f"pod-{i}", True) for i, url in enumerate(urls)})
    return table


def test_tier_rank_orders_device_best():
    assert [t.rank for t in (Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.ABSENT)] == [0, 1, 2, 3]
    assert Tier("host") is Tier.HOST


def test_sync_adds_updates_and_drops_but_keeps_what_was_learned():
    table = table_with(A, B)
    table.begin(A)
    table.apply_report(A, REPORT)
    table.sync({A: ("renamed", False), C: ("pod-c", True)})
    assert [ep.url for ep in table.all()] == [A, C]
    a = table.get(A)
    assert (a.name, a.ready, a.inflight, a.models["tiny-llama"]) == ("renamed", False, 1, Tier.DEVICE)
    assert table.get(B) is None
    assert table.get(C).inflight == 0 and table.get(C).models == {}


def test_apply_report_reads_every_field():
    clock = Clock()
    table = table_with(A, clock=clock)
    table.apply_report(A, REPORT)
    a = table.get(A)
    assert a.models == {"tiny-llama": Tier.DEVICE, "qwen": Tier.HOST, "bert": Tier.DISK,
                        "llama-70b": Tier.ABSENT, "tiny-llama-sql": Tier.DEVICE}
    assert a.parents == {"tiny-llama-sql": "tiny-llama"}
    assert a.model_bytes == {"tiny-llama": 400}
    assert (a.queue_length, a.running, a.kv_cache_usage, a.draining, a.warm_tier) == (3, 5, 0.42, False, True)
    assert (a.free_bytes, a.evictable_bytes, a.last_report) == (400, 200, 50.0)
    assert (a.loading, a.max_loaded_models, a.loaded_models) == (frozenset({"llama-70b"}), 3, 2)


def test_a_later_report_replaces_models_and_missing_fields_become_neutral():
    table = table_with(A)
    table.apply_report(A, REPORT)
    table.apply_report(A, {"draining": True, "models": [{"id": "qwen", "state": "loaded"}]})
    a = table.get(A)
    assert a.models == {"qwen": Tier.DEVICE}
    assert (a.queue_length, a.running, a.kv_cache_usage, a.free_bytes, a.evictable_bytes) == (0, 0, 0.0, None, None)
    assert a.draining is True and a.warm_tier is False
    assert (a.loading, a.max_loaded_models, a.loaded_models) == (frozenset(), None, 0)


@pytest.mark.parametrize("report", [[], "x", {"models": "tiny"}, {"models": [{"tier": "device"}]},
                                    {"models": [{"id": 3}]}])
def test_a_malformed_report_raises_and_changes_nothing(report):
    table = table_with(A)
    table.apply_report(A, REPORT)
    with pytest.raises(ValueError):
        table.apply_report(A, report)
    assert table.get(A).queue_length == 3 and table.get(A).models["tiny-llama"] is Tier.DEVICE


def test_unknown_urls_are_ignored():
    table = table_with(A)
    table.apply_report(B, REPORT)
    table.apply_resident_header(B, "m", "m")
    table.begin(B)
    table.end(B, 0.1)
    table.mark_draining(B)
    table.record_success(B)
    assert [ep.url for ep in table.all()] == [A]


def test_resident_header_promotes_listed_ids_and_demotes_the_rest_to_the_warm_tier():
    table = table_with(A)
    table.apply_report(A, REPORT)  # warm_tier: true
    table.apply_resident_header(A, "qwen", "qwen, org%2Fmodel%2C1")
    a = table.get(A)
    assert a.models["qwen"] is Tier.DEVICE and a.models["org/model,1"] is Tier.DEVICE
    assert a.models["tiny-llama"] is Tier.HOST and a.models["tiny-llama-sql"] is Tier.HOST
    assert a.models["bert"] is Tier.DISK and a.models["llama-70b"] is Tier.ABSENT


def test_resident_header_demotes_to_absent_without_a_warm_tier():
    table = table_with(A)
    table.apply_report(A, {**REPORT, "warm_tier": False})
    table.apply_resident_header(A, "bert", "bert")
    assert table.get(A).models["tiny-llama"] is Tier.ABSENT
    table.apply_resident_header(A, "bert", "")  # nothing on the device any more
    assert table.get(A).models["bert"] is Tier.ABSENT


def test_without_the_header_a_2xx_answer_still_marks_the_model_on_the_device():
    table = table_with(A)
    table.apply_resident_header(A, "m", None)
    table.apply_resident_header(A, "n", None, status=200)
    table.apply_resident_header(A, "o", None, status=404)
    table.apply_resident_header(A, "p", None, status=503)
    table.apply_resident_header(A, None, None, status=200)
    assert table.get(A).models == {"m": Tier.DEVICE, "n": Tier.DEVICE}


def test_begin_end_count_inflight_and_smooth_ttfb_with_alpha_0_2():
    table = table_with(A)
    table.begin(A)
    table.begin(A)
    assert table.get(A).inflight == 2
    table.end(A, 1.0)
    assert table.get(A).ttfb_ema == pytest.approx(1.0)
    table.end(A, 2.0)
    assert table.get(A).ttfb_ema == pytest.approx(1.2)
    table.end(A, None)  # more ends than begins: never negative, EMA unchanged
    assert table.get(A).inflight == 0 and table.get(A).ttfb_ema == pytest.approx(1.2)


def test_mark_draining_until_a_report_says_otherwise():
    table = table_with(A)
    table.mark_draining(A)
    assert table.get(A).draining
    table.apply_report(A, REPORT)
    assert not table.get(A).draining


def test_models_view_lists_each_model_with_its_endpoints_best_tier_first():
    table = table_with(A, B)
    table.apply_report(A, {"models": [{"id": "m", "tier": "host"}, {"id": "z", "tier": "absent"}]})
    table.apply_report(B, {"models": [{"id": "m", "tier": "device"}]})
    view = table.models_view()
    assert list(view) == ["m", "z"]
    assert [(ep.url, tier) for ep, tier in view["m"]] == [(B, Tier.DEVICE), (A, Tier.HOST)]
    assert [(ep.url, tier) for ep, tier in view["z"]] == [(A, Tier.ABSENT)]
