"""The threaded engine behind asyncio: concurrent streams, disconnects, shutdown, metrics."""

from __future__ import annotations

import asyncio
import random

import pytest
from kubeinfer_serving import metrics
from kubeinfer_serving.engine.async_engine import AsyncLLMEngine
from kubeinfer_serving.engine.errors import EngineDeadError, PromptTooLongError
from kubeinfer_serving.engine.sampling import SamplingParams


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, 8192) for _ in range(n)]


async def _collect(engine, rid, prompt, params):
    outs = []
    async for o in engine.generate(rid, prompt, params):
        outs.append(o)
    return outs


async def _wait_idle(engine: AsyncLLMEngine, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


@pytest.fixture
async def aengine(make_engine):
    eng = AsyncLLMEngine(make_engine(num_kv_blocks=64, max_num_batched_tokens=64))
    yield eng
    await eng.shutdown()


async def test_concurrent_streams_match_hf(aengine, hf_greedy):
    reqs = [(f"c{i}", _prompt(i, 4 + 9 * i), 3 + 2 * i) for i in range(8)]
    results = await asyncio.gather(*(
        _collect(aengine, rid, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for rid, p, n in reqs
    ))
    for (_rid, p, n), outs in zip(reqs, results, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == hf_greedy(p, n)
        assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_prompt_tokens == len(p)
    await _wait_idle(aengine)
    gen = metrics.REGISTRY.get_sample_value("kubeinfer_generation_tokens_total", {"model_name": "tiny-test"})
    assert gen is not None and gen >= sum(n for _, _, n in reqs)
    assert metrics.REGISTRY.get_sample_value("kubeinfer_time_to_first_token_seconds_count", {"model_name": "tiny-test"})


async def test_consumer_that_stops_early_aborts_and_frees_blocks(aengine):
    stream = aengine.generate("leaver", _prompt(1, 60), SamplingParams(max_tokens=500, ignore_eos=True))
    first = await stream.__anext__()
    assert not first.finished
    assert aengine.stats().num_running == 1
    await stream.aclose()  # what a client disconnect does to the API's generator
    await _wait_idle(aengine)


async def test_cancelled_task_aborts_its_request(aengine):
    started = asyncio.Event()

    async def consume():
        async for _ in aengine.generate("cancelled", _prompt(2, 30), SamplingParams(max_tokens=500, ignore_eos=True)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(aengine)


async def test_errors_are_raised_before_any_output(aengine):
    with pytest.raises(PromptTooLongError):
        await _collect(aengine, "big", list(range(6, 1030)), SamplingParams(max_tokens=100))
    assert aengine.stats().num_waiting == 0


async def test_shutdown_finishes_outstanding_requests_with_abort(make_engine):
    eng = AsyncLLMEngine(make_engine(num_kv_blocks=64))
    stream = eng.generate("long", _prompt(3, 10), SamplingParams(max_tokens=900, ignore_eos=True))
    await stream.__anext__()
    await eng.shutdown()
    rest = [o async for o in stream]
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert eng.engine.runner.kv_caches == [] and eng.engine.model is None
    with pytest.raises(EngineDeadError):
        await _collect(eng, "late", [7, 8], SamplingParams())


async def test_sink_gets_every_output_on_the_loop_and_delivery_ends_with_the_last(aengine, hf_greedy):
    """``add_request``: the engine thread hands each output to the caller's sink, on the caller's
    loop (the API's one queue per request); the finished output ends the delivery by itself, and
    detaching a running request aborts it and frees its blocks."""
    loop = asyncio.get_running_loop()
    got: asyncio.Queue = asyncio.Queue()

    def sink(item) -> None:
        assert asyncio.get_running_loop() is loop
        got.put_nowait(item)

    prompt = _prompt(11, 9)
    aengine.add_request("sunk", prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), sink)
    outs = []
    while not outs or not outs[-1].finished:
        outs.append(await asyncio.wait_for(got.get(), 60))
    assert [t for o in outs for t in o.new_token_ids] == hf_greedy(prompt, 5)
    aengine.add_request("sunk", prompt, SamplingParams(max_tokens=1), sink)  # the id is free again: no detach needed
    while not (await asyncio.wait_for(got.get(), 60)).finished:
        pass
    aengine.add_request("cut", _prompt(12, 30), SamplingParams(max_tokens=500, ignore_eos=True), sink)
    await asyncio.wait_for(got.get(), 60)
    aengine.detach("cut")
    await _wait_idle(aengine)


async def test_validation_errors_reach_the_sink(aengine):
    """A request the model cannot serve comes back through the sink (the engine validates it when it takes it in)."""
    got: asyncio.Queue = asyncio.Queue()
    aengine.add_request("long", [7] * 10, SamplingParams(max_tokens=10**6), got.put_nowait)
    err = await asyncio.wait_for(got.get(), 60)
    assert isinstance(err, PromptTooLongError) and err.param == "prompt"
    assert str(err) == str(PromptTooLongError(aengine.max_model_len, 10, 10**6))
