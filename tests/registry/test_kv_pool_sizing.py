"""KV pools sized from the pod's memory budget, with real tiny engines on CPU (the CPU rule)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kubeinfer_serving.engine.kv_sizing import KVPoolSizeError
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.layers.linear import PACKED_LINEAR_ENV
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry
from kubeinfer_serving.registry.catalogue import CatalogueError, parse_catalogue
from kubeinfer_serving.registry.protocol import ModelState, ModelUnavailableError

from tests.tiny_model import BLOCK, LINEAR_WEIGHTS, WEIGHTS

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _unpacked(monkeypatch):
    """The arithmetic of these tests counts the checkpoint's weights: no packed copies (those are
    counted in test_the_cpu_packed_weight_copies_count_against_the_budget)."""
    monkeypatch.setenv(PACKED_LINEAR_ENV, "0")


async def generate(reg: ModelRegistry, name: str) -> list[int]:
    async with reg.acquire(name) as served:
        out: list[int] = []
        async for o in served.engine.generate(f"r-{name}", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)):
            out.extend(o.new_token_ids)
        return out


def entry(name: str, path: Path, **kw) -> ModelEntry:
    return ModelEntry(name=name, source=f"file://{path}", **kw)


async def test_an_auto_pool_on_cpu_takes_what_the_budget_leaves_and_logs_the_arithmetic(model_dirs, caplog) -> None:
    """Budget = weights + 10 MiB: the pool is 160 blocks (with a fixed 256 MiB default the load failed)."""
    caplog.set_level(logging.INFO, logger="kubeinfer_serving.registry.manager")
    reg = ModelRegistry(Catalogue(models=[entry("a", model_dirs["tiny-0"], preload=True)]),
                        budget_bytes=WEIGHTS + 10 * MiB, device="cpu")
    await reg.start()
    try:
        [info] = reg.list_models()
        assert info.state is ModelState.LOADED
        async with reg.acquire("a") as served:
            assert served.engine.engine.num_kv_blocks == 10 * MiB // BLOCK
        assert info.bytes == WEIGHTS + 10 * MiB
        assert len(await generate(reg, "a")) == 4
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV pool of 'a'"))
        assert "160 blocks x 65536 B = 10.00 MiB" in line and "the cpu default, capped by what is left" in line
    finally:
        await reg.shutdown()


async def test_the_cpu_packed_weight_copies_count_against_the_budget(model_dirs, monkeypatch) -> None:
    """With packed linear weights (the CPU float32 default) the pool gets what weights + their
    packed copies leave, and a reload plans with the measured weights."""
    monkeypatch.setenv(PACKED_LINEAR_ENV, "1")
    reg = ModelRegistry(Catalogue(models=[entry("a", model_dirs["tiny-0"])]), budget_bytes=WEIGHTS + 30 * MiB,
                        device="cpu")
    try:
        async with reg.acquire("a") as served:
            engine = served.engine.engine
            packed = engine.weights_bytes - WEIGHTS
            assert packed >= LINEAR_WEIGHTS  # every linear weight has a packed copy, at least as large
            assert engine.num_kv_blocks == (30 * MiB - packed) // BLOCK
        assert reg.loader.plan(reg.catalogue.entry("a")).weights_bytes == WEIGHTS + packed
    finally:
        await reg.shutdown()


async def test_an_auto_pool_with_room_gets_the_cpu_default(model_dirs) -> None:
    reg = ModelRegistry(Catalogue(models=[entry("a", model_dirs["tiny-0"])]), budget_bytes=8 << 30, device="cpu")
    try:
        async with reg.acquire("a") as served:
            assert served.engine.engine.num_kv_blocks == 256 * MiB // BLOCK
    finally:
        await reg.shutdown()


async def test_fraction_and_bytes_are_honoured_and_a_pool_that_does_not_fit_fails_alone(model_dirs) -> None:
    """a asks 25% of a 256 MiB budget, b 8 MiB; c asks 200 MiB more than is left: c fails with the
    numbers in /v1/models and its 503; a and b keep serving."""
    budget = 256 * MiB
    reg = ModelRegistry(Catalogue(models=[
        entry("a", model_dirs["tiny-0"], preload=True, kvCacheFraction=0.25),
        entry("b", model_dirs["tiny-1"], preload=True, kvCacheBytes=8 * MiB),
        entry("c", model_dirs["tiny-2"], kvCacheBytes=200 * MiB),
    ], acquireTimeoutSeconds=1), budget_bytes=budget, device="cpu")
    await reg.start()
    try:
        async with reg.acquire("a") as a, reg.acquire("b") as b:
            assert a.engine.engine.num_kv_blocks == (budget // 4) // BLOCK
            assert b.engine.engine.num_kv_blocks == 8 * MiB // BLOCK
        with pytest.raises(ModelUnavailableError) as err:
            await generate(reg, "c")
        state = {i.name: i for i in reg.list_models()}
        assert state["c"].state in (ModelState.FAILED, ModelState.UNLOADED)
        assert "no memory for model 'c'" in str(err.value) or "KV pool" in str(err.value)
        assert len(await generate(reg, "a")) == 4 and len(await generate(reg, "b")) == 4
    finally:
        await reg.shutdown()


async def test_a_model_that_does_not_fit_beside_the_others_fails_alone(model_dirs) -> None:
    """b (auto) needs its weights and one block beside a (preloaded): one byte short, b gets 503 naming
    the numbers, a keeps serving."""
    reg = ModelRegistry(Catalogue(models=[
        entry("a", model_dirs["tiny-0"], preload=True, kvCacheBytes=4 * MiB),
        entry("b", model_dirs["tiny-1"]),
    ], acquireTimeoutSeconds=0.5), budget_bytes=2 * WEIGHTS + 4 * MiB + BLOCK - 1, device="cpu")
    await reg.start()
    try:
        with pytest.raises(ModelUnavailableError) as err:
            await generate(reg, "b")
        assert f"it needs {WEIGHTS + BLOCK} bytes, {WEIGHTS + 4 * MiB} of {2 * WEIGHTS + 4 * MiB + BLOCK - 1}" in str(
            err.value)
        assert len(await generate(reg, "a")) == 4
    finally:
        await reg.shutdown()


async def test_a_measured_activation_peak_that_leaves_no_room_fails_naming_the_numbers(model_dirs) -> None:
    """The registry's sizing step with the activation peak a CUDA profiling pass reports: when weights +
    peak leave less than a block beside the other models, it raises with every number, and the model's
    reservation is untouched (the load then fails; tests/registry CUDA tests run it end to end)."""
    reg = ModelRegistry(Catalogue(models=[
        entry("a", model_dirs["tiny-0"], preload=True, kvCacheBytes=4 * MiB),
        entry("b", model_dirs["tiny-1"]),
    ]), budget_bytes=2 * WEIGHTS + 40 * MiB, device="cpu")
    await reg.start()
    try:
        with pytest.raises(KVPoolSizeError) as err:
            reg.size_kv("b", WEIGHTS, 36 * MiB, BLOCK, 1 << 20)
        msg = str(err.value)
        assert "no memory left for the KV pool of 'b'" in msg
        for part in (f"budget {(2 * WEIGHTS + 40 * MiB) / MiB:.2f} MiB", f"other models {(WEIGHTS + 4 * MiB) / MiB:.2f} MiB",
                     f"weights {WEIGHTS / MiB:.2f} MiB", "activation peak 36.00 MiB", "leaves 0.00 MiB"):
            assert part in msg
        assert reg.used_bytes() == WEIGHTS + 4 * MiB
        ok = reg.size_kv("b", WEIGHTS, 20 * MiB, BLOCK, 1 << 20)
        assert ok.rule == "auto" and ok.kv_bytes == 16 * MiB and reg.used_bytes() == 2 * WEIGHTS + 40 * MiB
    finally:
        await reg.shutdown()


async def test_graph_memory_and_the_null_block_are_reserved_with_the_pool(model_dirs) -> None:
    """The sizing step with what a CUDA load reports for its decode graphs (measured bytes, one null
    block): the pool shrinks by both, the reservation holds both, and the pod's total stays within
    the budget; an asked pool that fits alone but not beside them fails naming them."""
    graphs = 3 * MiB + 512
    reg = ModelRegistry(Catalogue(models=[
        entry("a", model_dirs["tiny-0"], preload=True, kvCacheBytes=4 * MiB),
        entry("b", model_dirs["tiny-1"]),
        entry("c", model_dirs["tiny-2"], kvCacheBytes=16 * MiB),
    ]), budget_bytes=2 * WEIGHTS + 40 * MiB, device="cpu")
    await reg.start()
    try:
        # c's 16 MiB fit beside a, weights and an 8 MiB peak (28 MiB left), not beside 25 MiB of graphs too.
        with pytest.raises(KVPoolSizeError, match=r"CUDA graphs 25.00 MiB .* - null block 0.06 MiB"):
            reg.size_kv("c", WEIGHTS, 8 * MiB, BLOCK, 1 << 20, graph_bytes=25 * MiB, extra_blocks=1)
        assert reg.used_bytes() == WEIGHTS + 4 * MiB  # a failed sizing reserves nothing
        b = reg.size_kv("b", WEIGHTS, 8 * MiB, BLOCK, 1 << 20, graph_bytes=graphs, extra_blocks=1)
        assert b.num_blocks == (36 * MiB - 8 * MiB - graphs - BLOCK) // BLOCK
        assert reg.used_bytes() == WEIGHTS + 4 * MiB + WEIGHTS + 8 * MiB + graphs + (b.num_blocks + 1) * BLOCK
        assert reg.used_bytes() <= reg.budget_bytes
    finally:
        await reg.shutdown()


async def test_auto_pools_share_what_is_left_with_the_auto_models_still_to_come(model_dirs) -> None:
    budget = 3 * WEIGHTS + 30 * MiB
    reg = ModelRegistry(Catalogue(models=[entry(n, p) for n, p in model_dirs.items()]),
                        budget_bytes=budget, device="cpu")
    try:
        async with reg.acquire("tiny-0") as first:
            # 2 x WEIGHTS + 30 MiB left for this pool and two more auto models' weights and pools: a third each
            assert first.engine.engine.num_kv_blocks == ((budget - WEIGHTS) // 3) // BLOCK
    finally:
        await reg.shutdown()


def test_kv_fraction_is_validated() -> None:
    src = "builtin://tiny-llama"
    with pytest.raises(CatalogueError, match="kvCacheBytes or kvCacheFraction, not both"):
        parse_catalogue({"models": [{"name": "m", "source": src, "kvCacheBytes": 1, "kvCacheFraction": 0.5}]})
    for bad in (0, 1.01, -0.1):
        with pytest.raises(CatalogueError, match="kvCacheFraction"):
            parse_catalogue({"models": [{"name": "m", "source": src, "kvCacheFraction": bad}]})
    assert parse_catalogue({"models": [{"name": "m", "source": src, "kvCacheFraction": 1}]}).models[0].kv_cache_fraction == 1


@pytest.mark.cuda
async def test_on_cuda_the_pool_takes_what_weights_and_the_measured_peak_leave(model_dirs, caplog) -> None:
    """bf16 on CUDA: the registry profiles a step at maxNumBatchedTokens, reserves weights + peak + pool
    = the whole budget; a budget below weights + peak fails the load with the numbers."""
    caplog.set_level(logging.INFO, logger="kubeinfer_serving.registry.manager")
    weights = WEIGHTS // 2  # bf16
    budget = weights + 512 * MiB
    reg = ModelRegistry(Catalogue(models=[entry("a", model_dirs["tiny-0"], preload=True)], maxNumBatchedTokens=4096),
                        budget_bytes=budget, device="cuda")
    await reg.start()
    try:
        async with reg.acquire("a") as served:
            sizing = served.engine.engine.kv_sizing
            assert sizing.rule == "auto" and sizing.activation_bytes > 0
            # Decode graphs are on by default on CUDA: their measured memory and the null block come off too.
            assert sizing.graph_bytes > 0 and sizing.extra_blocks == 1
            left = budget - weights - sizing.activation_bytes - sizing.graph_bytes - BLOCK // 2
            assert sizing.kv_bytes == left // (BLOCK // 2) * (BLOCK // 2)
            engine = served.engine.engine
            held = weights + sizing.activation_bytes + engine.cuda_graph_bytes + engine.kv_cache_bytes
        assert reg.list_models()[0].bytes == held and engine.kv_cache_bytes == sizing.kv_bytes + BLOCK // 2
        assert len(await generate(reg, "a")) == 4
        assert any("activation peak" in r.getMessage() and "not measured" not in r.getMessage() for r in caplog.records)
        peak = sizing.activation_bytes
    finally:
        await reg.shutdown()
    reg = ModelRegistry(Catalogue(models=[entry("a", model_dirs["tiny-0"], preload=True)], maxNumBatchedTokens=4096),
                        budget_bytes=weights + peak // 2, device="cuda")
    await reg.start()
    try:
        [info] = reg.list_models()
        assert info.state is ModelState.FAILED and "no memory left for the KV pool of 'a'" in info.message
        assert "activation peak" in info.message
    finally:
        await reg.shutdown()
