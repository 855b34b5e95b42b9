"""Registry scheduling: single-flight loads, LRU eviction of idle models within a byte budget and
a count limit, waiting with a timeout, Failed models, the warm tier and the admin operations.

The loader is :class:`tests.registry.fakes.FakeLoader` (instant, sizes chosen per test); the
engine-backed path is covered by test_registry_engines.py.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from kubeinfer_serving import metrics
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry
from kubeinfer_serving.registry.protocol import (
    ModelKind,
    ModelNotFoundError,
    ModelState,
    ModelUnavailableError,
)

from tests.registry.fakes import FakeLoader, missing_files

MiB = 1 << 20


def make(sizes: dict[str, int], *, budget: int = 1 << 40, preload: tuple[str, ...] = (), embed: tuple[str, ...] = (),
         loader: FakeLoader | None = None, **limits) -> tuple[ModelRegistry, FakeLoader]:
    models = [ModelEntry(name=n, source=f"/models/{n}", preload=n in preload,
                         kind=ModelKind.EMBED if n in embed else ModelKind.GENERATE) for n in sizes]
    cat = Catalogue(models=models, memory_budget_bytes=budget, **limits)
    fake = loader or FakeLoader(sizes)
    return ModelRegistry(cat, loader=fake, device="cpu"), fake


def states(reg: ModelRegistry) -> dict[str, str]:
    return {i.name: i.state.value for i in reg.list_models()}


def metric(counter, name: str) -> float:
    return counter.labels(model_name=name)._value.get()


async def use(reg: ModelRegistry, name: str, hold: float = 0.0) -> str:
    async with reg.acquire(name) as served:
        await asyncio.sleep(hold)
        return served.engine or served.embedder


async def test_concurrent_requests_share_one_load() -> None:
    reg, fake = make({"a": MiB}, loader=FakeLoader({"a": MiB}, load_seconds=0.2))
    results = await asyncio.gather(*(use(reg, "a") for _ in range(25)))
    assert results == ["engine of a"] * 25
    assert fake.loads["a"] == 1
    assert states(reg)["a"] == "loaded"


async def test_state_is_loading_while_the_load_runs() -> None:
    reg, _ = make({"a": MiB}, loader=FakeLoader({"a": MiB}, load_seconds=0.3))
    task = asyncio.create_task(use(reg, "a"))
    await asyncio.sleep(0.1)
    assert states(reg)["a"] == "loading"
    await task
    info = reg.list_models()[0]
    assert info.state is ModelState.LOADED and info.bytes == MiB


async def test_count_limit_evicts_least_recently_used_idle_model() -> None:
    reg, fake = make({"a": MiB, "b": MiB, "c": MiB}, max_loaded_models=2)
    before = metric(metrics.MODEL_EVICTIONS, "b")
    await use(reg, "a")
    await use(reg, "b")
    await use(reg, "a")  # a is now more recently used than b
    await use(reg, "c")
    assert states(reg) == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert fake.closes == {"b": 1} and fake.peak_count == 2
    assert metric(metrics.MODEL_EVICTIONS, "b") == before + 1
    assert [(e.model, e.action) for e in reg.events][-2:] == [("b", "evict"), ("c", "cold_load")]


async def test_byte_budget_evicts_only_what_is_needed_in_lru_order() -> None:
    sizes = {"s1": 20 * MiB, "s2": 20 * MiB, "big": 50 * MiB, "mid": 30 * MiB, "wide": 45 * MiB}
    reg, fake = make(sizes, budget=100 * MiB)
    for name in ("s1", "s2", "big"):
        await use(reg, name)
    await use(reg, "mid")  # 90 + 30 > 100: evicting s1 (least recent) is enough
    assert states(reg) == {"s1": "unloaded", "s2": "loaded", "big": "loaded", "mid": "loaded", "wide": "unloaded"}
    assert reg.used_bytes() == 100 * MiB
    await use(reg, "wide")  # 100 + 45: s2 then big go (LRU order); mid stays
    assert states(reg) == {"s1": "unloaded", "s2": "unloaded", "big": "unloaded", "mid": "loaded", "wide": "loaded"}
    assert reg.used_bytes() == 75 * MiB
    assert fake.peak_bytes <= 100 * MiB
    assert [e.model for e in reg.events if e.action == "evict"] == ["s1", "s2", "big"]


async def test_busy_models_are_never_evicted_and_requests_get_503_naming_them() -> None:
    reg, fake = make({"a": MiB, "b": MiB, "c": MiB}, max_loaded_models=2, acquire_timeout_seconds=0.3)
    async with reg.acquire("a"), reg.acquire("b"):
        with pytest.raises(ModelUnavailableError) as err:
            await use(reg, "c")
        assert err.value.status == 503 and err.value.retry_after
        assert "'c'" in err.value.message and "a (1 running" in err.value.message and "b (1 running" in err.value.message
        assert states(reg) == {"a": "loaded", "b": "loaded", "c": "unloaded"}
    assert fake.closes == {}
    assert await use(reg, "c") == "engine of c"  # both idle now: one is evicted


async def test_waiting_request_is_served_when_a_model_becomes_idle() -> None:
    reg, fake = make({"a": MiB, "b": MiB, "c": MiB}, max_loaded_models=2, acquire_timeout_seconds=10)
    release_b = asyncio.Event()

    async def hold_b_until_released() -> None:
        async with reg.acquire("b"):
            await release_b.wait()

    hold_a = asyncio.create_task(use(reg, "a", hold=0.3))
    hold_b = asyncio.create_task(hold_b_until_released())
    await asyncio.sleep(0.1)
    got_c = await use(reg, "c")  # waits until a is released, then evicts a (b is still busy)
    assert got_c == "engine of c"
    assert hold_a.done() and not hold_b.done()
    assert fake.closes == {"a": 1}
    release_b.set()
    await hold_b


async def test_preloaded_models_are_loaded_by_start_and_never_evicted() -> None:
    reg, fake = make({"p": MiB, "b": MiB, "c": MiB}, preload=("p",), max_loaded_models=2,
                     acquire_timeout_seconds=0.2)
    assert not reg.is_ready()
    await reg.start()
    assert reg.is_ready() and states(reg)["p"] == "loaded"
    await use(reg, "b")
    await use(reg, "c")  # p is least recently used but preloaded: b goes
    assert states(reg) == {"p": "loaded", "b": "unloaded", "c": "loaded"}
    async with reg.acquire("c"):
        with pytest.raises(ModelUnavailableError, match=r"p \(preloaded"):
            await use(reg, "b")
    with pytest.raises(ModelUnavailableError, match="preloaded"):
        await reg.unload("p")
    assert fake.closes == {"b": 1}


async def test_failed_model_fails_alone_with_its_reason() -> None:
    loader = FakeLoader({"good": MiB, "bad": MiB, "oom": MiB}, plan_errors={"bad": missing_files("bad")},
                        load_errors={"oom": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")})
    reg, fake = make(loader.sizes, loader=loader, preload=("bad",))
    before = metric(metrics.MODEL_LOAD_FAILURES, "bad")
    await reg.start()  # does not raise
    assert not reg.is_ready()  # its only preload failed (with others loaded it would be ready: test_hardening D7)
    for name, reason in (("bad", "no *.safetensors weight files in /models/bad"), ("oom", "CUDA out of memory")):
        with pytest.raises(ModelUnavailableError, match=reason.replace("*", r"\*")) as err:
            await use(reg, name)
        assert err.value.status == 503
        info = {i.name: i for i in reg.list_models()}[name]
        assert info.state is ModelState.FAILED and reason in info.message
    assert metric(metrics.MODEL_LOAD_FAILURES, "bad") == before + 1
    assert await use(reg, "good") == "engine of good"
    # a failed model is not retried by requests, only by an explicit load
    with pytest.raises(ModelUnavailableError):
        await use(reg, "bad")
    assert metric(metrics.MODEL_LOAD_FAILURES, "bad") == before + 1
    loader.plan_errors.clear()
    info = await reg.load("bad")
    assert info.state is ModelState.LOADED and reg.is_ready()


async def test_model_larger_than_the_budget_fails_with_sizes() -> None:
    reg, _ = make({"huge": 200 * MiB}, budget=100 * MiB)
    with pytest.raises(ModelUnavailableError, match="more than the whole memory budget"):
        await use(reg, "huge")
    assert states(reg)["huge"] == "failed"


async def test_unknown_model_is_404() -> None:
    reg, _ = make({"a": MiB})
    with pytest.raises(ModelNotFoundError) as err:
        await use(reg, "nope")
    assert err.value.status == 404
    with pytest.raises(ModelNotFoundError):
        await reg.load("nope")
    with pytest.raises(ModelNotFoundError):
        await reg.unload("nope")


async def test_admin_unload_and_load() -> None:
    reg, fake = make({"a": MiB, "b": MiB})
    info = await reg.load("a")
    assert info.state is ModelState.LOADED and info.bytes == MiB
    async with reg.acquire("a"):
        with pytest.raises(ModelUnavailableError, match="busy"):
            await reg.unload("a")
    info = await reg.unload("a")
    assert info.state is ModelState.UNLOADED and info.bytes == 0
    assert reg.used_bytes() == 0 and fake.resident == {}
    assert (await reg.unload("b")).state is ModelState.UNLOADED  # already unloaded: a no-op
    assert [e.action for e in reg.events] == ["cold_load", "unload"]


async def test_warm_tier_reloads_from_host_memory_within_its_bound() -> None:
    reg, fake = make({"a": 40 * MiB, "b": 40 * MiB, "c": 40 * MiB}, max_loaded_models=1, warm_cache_bytes=50 * MiB)
    await use(reg, "a")
    await use(reg, "b")  # evicts a -> warm tier holds a
    assert reg.warm.names() == ["a"]
    await use(reg, "c")  # evicts b -> the tier holds 50 MiB: a is dropped for b
    assert reg.warm.names() == ["b"] and reg.warm.nbytes == 40 * MiB
    await use(reg, "b")
    assert fake.warm_loads == {"b": 1} and fake.loads == {"a": 1, "b": 1, "c": 1}
    assert reg.events[-1].action == "warm_load" and "b" not in reg.warm
    await use(reg, "a")  # dropped from the tier: cold again
    assert fake.loads["a"] == 2


async def test_storm_over_three_models_keeps_limits_and_serves_everyone() -> None:
    sizes = {"m0": 30 * MiB, "m1": 30 * MiB, "m2": 30 * MiB}
    reg, fake = make(sizes, budget=70 * MiB, max_loaded_models=2, acquire_timeout_seconds=30,
                     loader=FakeLoader(sizes, load_seconds=0.01))
    rng = random.Random(7)
    names = [f"m{rng.randrange(3)}" for _ in range(60)]
    results = await asyncio.gather(*(use(reg, n, hold=rng.uniform(0, 0.02)) for n in names))
    assert results == [f"engine of {n}" for n in names]
    assert fake.peak_count <= 2 and fake.peak_bytes <= 70 * MiB
    loads = sum(fake.loads.values())
    evictions = sum(1 for e in reg.events if e.action == "evict")
    assert loads >= 3 and evictions == loads - len(fake.resident)


async def test_shutdown_closes_everything() -> None:
    reg, fake = make({"a": MiB, "b": MiB}, preload=("a",))
    await reg.start()
    await use(reg, "b")
    await reg.shutdown()
    assert fake.resident == {} and reg.used_bytes() == 0
    assert set(states(reg).values()) == {"unloaded"}
    with pytest.raises(ModelUnavailableError, match="shutting down"):
        await use(reg, "a")
