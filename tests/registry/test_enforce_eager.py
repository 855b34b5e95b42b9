"""enforceEager from the catalogue reaches each generate model's engine (pod-wide, then per model)."""

from __future__ import annotations

from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry


async def test_each_engine_gets_its_entry_else_the_pod_enforce_eager(model_dirs) -> None:
    reg = ModelRegistry(Catalogue(enforce_eager=True, models=[
        ModelEntry(name="a", source=f"file://{model_dirs['tiny-0']}"),
        ModelEntry(name="b", source=f"file://{model_dirs['tiny-1']}", enforceEager=False),
    ]), budget_bytes=4 << 30, device="cpu")
    try:
        async with reg.acquire("a") as a, reg.acquire("b") as b:
            assert a.engine.engine.config.enforce_eager is True
            assert b.engine.engine.config.enforce_eager is False
            # On CPU no graphs are captured either way: the pool has no null block.
            assert a.engine.engine.runner.graphs is None and b.engine.engine.runner.graphs is None
    finally:
        await reg.shutdown()
