"""Per-device budgets of a pod with several devices (issue 23 item 4): where single-device and
tensor-parallel models go, and which idle models the LRU evicts to make room on those devices.

The devices are CPU "slots" injected through the registry's ``devices`` (the host budget is split
between them; on GPUs each device has its own budget); the loader is
:class:`tests.registry.fakes.FakeLoader`. The placement policy is :mod:`kubeinfer_serving.registry.placement`.
"""

from __future__ import annotations

import asyncio

import pytest
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry
from kubeinfer_serving.registry.placement import Holder, place
from kubeinfer_serving.registry.protocol import ModelUnavailableError

from tests.registry.fakes import FakeLoader


def make(sizes: dict[str, int], *, slots: int, per_slot: int, tp: dict[str, int] | None = None,
         **limits) -> tuple[ModelRegistry, FakeLoader]:
    tp = tp or {}
    models = [ModelEntry(name=n, source=f"/models/{n}", tensor_parallel_size=tp.get(n, 1)) for n in sizes]
    cat = Catalogue(models=models, memory_budget_bytes=slots * per_slot, **limits)
    fake = FakeLoader(sizes, load_seconds=0.0)
    return ModelRegistry(cat, loader=fake, device="cpu", devices=["cpu"] * slots), fake


async def use(reg: ModelRegistry, *names: str) -> None:
    for name in names:
        async with reg.acquire(name):
            await asyncio.sleep(0.01)  # distinct last-used times


def test_host_budget_is_split_between_cpu_slots() -> None:
    reg, _ = make({"a": 1}, slots=4, per_slot=1000)
    assert reg.budgets == [1000] * 4
    assert reg.budget_bytes == 4000


def test_one_device_keeps_one_budget() -> None:
    reg, _ = make({"a": 1}, slots=1, per_slot=1000)
    assert reg.budgets == [1000] and reg.budget_bytes == 1000 and len(reg.devices) == 1


async def test_single_device_models_go_to_the_device_with_most_free_bytes() -> None:
    reg, fake = make({"a": 600, "b": 300, "c": 300}, slots=2, per_slot=1000)
    await use(reg, "a", "b", "c")
    assert [reg.placement(n) for n in "abc"] == [(0,), (1,), (1,)]
    assert reg.device_used_bytes() == [600, 600]
    assert sum(fake.closes.values()) == 0


async def test_tensor_parallel_model_charges_each_rank_device() -> None:
    reg, _ = make({"a": 300, "t": 1000}, slots=4, per_slot=1000, tp={"t": 2})
    await use(reg, "a", "t")
    assert reg.placement("a") == (0,)
    assert reg.placement("t") == (1, 2)  # the contiguous pair with the most room
    assert reg.device_used_bytes() == [300, 500, 500, 0]


async def test_lru_evicts_only_models_on_the_devices_the_new_model_needs() -> None:
    reg, fake = make({"a": 800, "b": 800, "c": 800, "d": 800, "t": 1000}, slots=4, per_slot=1000, tp={"t": 2})
    await use(reg, "a", "b", "c", "d", "a")  # LRU order now: b, c, d, a
    assert [reg.placement(n) for n in "abcd"] == [(0,), (1,), (2,), (3,)]
    await use(reg, "t")
    # Each pair of devices needs two evictions; (1, 2) evicts the two least recently used.
    assert reg.placement("t") == (1, 2)
    assert fake.closes == {"b": 1, "c": 1}
    assert set(fake.resident) == {"a", "d", "t"}
    assert reg.device_used_bytes() == [800, 500, 500, 800]


async def test_single_device_model_evicts_the_lru_model_of_one_device() -> None:
    reg, fake = make({"a": 600, "b": 300, "c": 300, "d": 500}, slots=2, per_slot=1000)
    await use(reg, "a", "b", "c")  # a on 0; b and c on 1; a is the least recently used
    await use(reg, "d")
    assert fake.closes == {"a": 1}
    assert reg.placement("d") == (0,)
    assert reg.device_used_bytes() == [500, 600]


async def test_eviction_never_touches_a_busy_model_and_waits_for_it() -> None:
    reg, fake = make({"a": 900, "b": 900}, slots=1, per_slot=1000, acquire_timeout_seconds=0.3)
    async with reg.acquire("a"):
        with pytest.raises(ModelUnavailableError, match="no memory for model 'b'"):
            await use(reg, "b")
    assert fake.closes["a"] == 0


async def test_model_count_limit_evicts_lru_on_any_device() -> None:
    reg, fake = make({"a": 100, "b": 100, "c": 100}, slots=2, per_slot=1000, max_loaded_models=2)
    await use(reg, "a", "b", "c")
    assert fake.closes == {"a": 1}
    assert set(fake.resident) == {"b", "c"}


async def test_model_larger_than_one_device_fails_with_the_device_budget() -> None:
    reg, fake = make({"big": 1500, "t": 1500}, slots=2, per_slot=1000, tp={"t": 2})
    with pytest.raises(ModelUnavailableError, match="more than the whole memory budget of 1000 bytes"):
        await use(reg, "big")
    await use(reg, "t")  # the same bytes split over both devices fit
    assert reg.placement("t") == (0, 1)
    assert reg.device_used_bytes() == [750, 750]


def test_place_prefers_fitting_over_evicting() -> None:
    old = Holder("old", (0,), 900, last_used=1.0, evictable=True)
    chosen = place(500, 1, [1000, 1000], [old])
    assert chosen is not None and chosen.devices == (1,) and chosen.victims == ()


def test_place_returns_none_when_nothing_can_be_evicted() -> None:
    busy = Holder("busy", (0, 1), 900, evictable=False)
    assert place(500, 1, [1000, 1000], [busy]) is None


async def test_real_split_model_charges_both_slots_and_serves(model_dirs) -> None:
    """The built-in tiny Llama split over 2 ranks on 2 CPU slots, beside an unsplit copy."""
    src = str(model_dirs["tiny-0"])
    cat = Catalogue(models=[ModelEntry(name="split", source=src, tensor_parallel_size=2, kv_cache_bytes=1 << 20),
                            ModelEntry(name="one", source=src, kv_cache_bytes=1 << 20)],
                    memory_budget_bytes=2 << 30)
    reg = ModelRegistry(cat, device="cpu", devices=["cpu", "cpu"])
    try:
        async with reg.acquire("split") as split:
            assert split.engine.engine.tp is not None
        async with reg.acquire("one"):
            pass
        split_bytes, one_bytes = (m.bytes for m in reg.list_models())
        assert reg.placement("split") == (0, 1)
        assert reg.placement("one") == (0,)  # both slots equally free: the first
        half = -(-split_bytes // 2)
        assert reg.device_used_bytes() == [half + one_bytes, half]
    finally:
        await reg.shutdown()
