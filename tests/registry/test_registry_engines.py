"""The registry with real engines: three tiny models (distinct seeds) under maxLoadedModels 2."""

from __future__ import annotations

import asyncio
import gc
import random
import shutil
import time
import weakref
from pathlib import Path

import pytest
import torch
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry
from kubeinfer_serving.registry.protocol import ModelState, ModelUnavailableError

PROMPT = "The harbour was quiet in the early morning."


def catalogue(dirs: dict[str, Path], **kw) -> Catalogue:
    models = [ModelEntry(name=n, source=f"file://{p}", kvCacheBytes=2 << 20) for n, p in dirs.items()]
    return Catalogue(models=models, **kw)


async def greedy(reg: ModelRegistry, name: str, rid: str, n: int = 8) -> list[int]:
    async with reg.acquire(name) as served:
        ids = served.tokenizer(PROMPT).input_ids
        out: list[int] = []
        async for o in served.engine.generate(rid, ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
            out.extend(o.new_token_ids)
        return out


async def test_sixty_requests_over_three_models_get_their_own_greedy_output(model_dirs) -> None:
    reg = ModelRegistry(catalogue(model_dirs, maxLoadedModels=2, acquireTimeoutSeconds=120), device="cpu")
    try:
        expected = {}
        for name in model_dirs:  # one at a time: the reference output of each model
            expected[name] = await greedy(reg, name, f"ref-{name}")
        assert len({tuple(v) for v in expected.values()}) == 3  # distinct seeds, distinct outputs
        rng = random.Random(3)
        names = [rng.choice(list(model_dirs)) for _ in range(60)]
        outs = await asyncio.gather(*(greedy(reg, n, f"r{i}") for i, n in enumerate(names)))
        assert all(out == expected[n] for out, n in zip(outs, names, strict=True))
        loads = [e for e in reg.events if e.action.endswith("load")]
        evictions = [e for e in reg.events if e.action == "evict"]
        assert len(loads) >= 4 and len(evictions) == len(loads) - 2
        assert sum(i.state is ModelState.LOADED for i in reg.list_models()) == 2
    finally:
        await reg.shutdown()
    assert reg.used_bytes() == 0


async def test_catalogue_queue_cap_reaches_the_engine(model_dirs) -> None:
    """maxWaitingRequests bounds each engine's waiting queue: the request past it gets QueueFullError (HTTP 429)."""
    from kubeinfer_serving.engine.errors import QueueFullError

    one = {"tiny-0": model_dirs["tiny-0"]}
    reg = ModelRegistry(catalogue(one, maxNumSeqs=1, maxWaitingRequests=1), device="cpu")
    try:
        async with reg.acquire("tiny-0") as served:
            ids = served.tokenizer(PROMPT).input_ids
            params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
            running = served.engine.generate("run", ids, params)
            await running.__anext__()  # admitted and decoding: it holds the one running slot
            waiting = served.engine.generate("wait", ids, params)
            waiting_task = asyncio.ensure_future(waiting.__anext__())
            while served.engine.stats().num_waiting < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError):
                await served.engine.generate("over", ids, params).__anext__()
            await running.aclose()
            await waiting_task
            await waiting.aclose()
    finally:
        await reg.shutdown()


async def test_corrupt_model_fails_alone(model_dirs, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(model_dirs["tiny-0"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    dirs = {"tiny-0": model_dirs["tiny-0"], "broken": bad}
    reg = ModelRegistry(catalogue(dirs), device="cpu")
    try:
        with pytest.raises(ModelUnavailableError, match="corrupt safetensors"):
            await greedy(reg, "broken", "b")
        info = {i.name: i for i in reg.list_models()}
        assert info["broken"].state is ModelState.FAILED and "model.safetensors" in info["broken"].message
        assert len(await greedy(reg, "tiny-0", "ok")) == 8
    finally:
        await reg.shutdown()


async def test_eviction_frees_memory_and_warm_reload_is_identical(model_dirs) -> None:
    two = {k: model_dirs[k] for k in ("tiny-0", "tiny-1")}
    reg = ModelRegistry(catalogue(two, maxLoadedModels=1, warmCacheBytes=64 << 20), device="cpu")
    try:
        first = await greedy(reg, "tiny-0", "a")
        async with reg.acquire("tiny-0") as served:
            kv_ref = weakref.ref(served.engine.engine.runner.kv_caches[0][0])
        await greedy(reg, "tiny-1", "b")  # evicts tiny-0: weights to the warm tier, KV pool freed
        gc.collect()
        assert kv_ref() is None
        assert "tiny-0" in reg.warm and reg.used_bytes() == {i.name: i.bytes for i in reg.list_models()}["tiny-1"]
        assert await greedy(reg, "tiny-0", "c") == first
        assert [e.action for e in reg.events] == ["cold_load", "evict", "cold_load", "evict", "warm_load"]
        for e in reg.events:
            print(f"{e.model} {e.action} {e.seconds * 1000:.1f} ms {e.bytes} bytes")
    finally:
        await reg.shutdown()
    assert reg.used_bytes() == 0


@pytest.mark.cuda
async def test_cuda_eviction_returns_memory_allocated(model_dirs) -> None:
    one = {"tiny-0": model_dirs["tiny-0"]}
    reg = ModelRegistry(catalogue(one), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    await greedy(reg, "tiny-0", "a")
    assert torch.cuda.memory_allocated() > before + (2 << 20)
    await reg.unload("tiny-0")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1 << 20, "more than 1 MiB still allocated after unload"
    print(f"load+generate+unload {time.perf_counter() - t0:.2f} s")
    await reg.shutdown()
