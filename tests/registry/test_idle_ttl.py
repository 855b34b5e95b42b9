"""Idle TTL: non-preloaded models idle for their idleTimeoutSeconds are unloaded; /v1/models shows it."""

from __future__ import annotations

import asyncio

from kubeinfer_serving import metrics
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry

from tests.registry.fakes import FakeLoader

MiB = 1 << 20


def _registry(pod_ttl: float | None, model_ttls: dict[str, float | None], preload: tuple[str, ...] = ()):
    models = [ModelEntry(name=n, source=f"/models/{n}", preload=n in preload, idle_timeout_seconds=t)
              for n, t in model_ttls.items()]
    cat = Catalogue(models=models, memory_budget_bytes=1 << 40, idle_timeout_seconds=pod_ttl)
    fake = FakeLoader({n: MiB for n in model_ttls})
    return ModelRegistry(cat, loader=fake, device="cpu"), fake


def _states(reg: ModelRegistry) -> dict[str, tuple[str, str]]:
    return {i.name: (i.state.value, i.message) for i in reg.list_models()}


async def test_idle_models_are_unloaded_after_their_ttl() -> None:
    # "pod" inherits the pod's 2 s; "short" has its own 0.3 s; "never" opts out with 0; "pre" is preloaded.
    reg, fake = _registry(2.0, {"pod": None, "short": 0.3, "never": 0, "pre": None}, preload=("pre",))
    before = metrics.MODEL_IDLE_UNLOADS.labels(model_name="short")._value.get()
    await reg.start()
    try:
        for name in ("short", "never", "pod"):
            async with reg.acquire(name):
                pass
        ttl = {i.name: i.idle_timeout_seconds for i in reg.list_models()}
        assert ttl == {"pod": 2.0, "short": 0.3, "never": None, "pre": None}
        await asyncio.sleep(0.8)
        s = _states(reg)
        assert s["short"][0] == "unloaded" and "0.3 s without requests" in s["short"][1]
        assert s["pod"][0] == "loaded" and s["never"][0] == "loaded" and s["pre"][0] == "loaded"
        await asyncio.sleep(2.0)
        s = _states(reg)
        assert s["pod"][0] == "unloaded" and s["never"][0] == "loaded" and s["pre"][0] == "loaded"
        assert metrics.MODEL_IDLE_UNLOADS.labels(model_name="short")._value.get() == before + 1
        # A new request loads it again and clears the message.
        async with reg.acquire("short"):
            assert _states(reg)["short"] == ("loaded", "")
    finally:
        await reg.shutdown()


async def test_a_busy_model_is_not_unloaded() -> None:
    reg, _ = _registry(None, {"m": 0.1})
    await reg.start()
    try:
        async with reg.acquire("m"):
            await asyncio.sleep(0.4)  # held for longer than its TTL
            assert _states(reg)["m"][0] == "loaded"
        await asyncio.sleep(0.3)
        assert _states(reg)["m"][0] == "unloaded"
    finally:
        await reg.shutdown()
