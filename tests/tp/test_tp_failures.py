"""Tensor-parallel failures: a model whose heads do not divide, a worker that dies mid-request."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from kubeinfer_serving.distributed.sharding import TensorParallelError
from kubeinfer_serving.engine.async_engine import AsyncLLMEngine
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.errors import EngineDeadError
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.engine.sampling import SamplingParams


def test_heads_that_do_not_divide_fail_with_the_numbers(tiny_dir):
    with pytest.raises(TensorParallelError, match=r"4 attention heads do not divide by tensor parallel size 3"):
        LLMEngine.from_model_dir(tiny_dir, model_name="tiny", config=EngineConfig(device="cpu", tensor_parallel_size=3))


def test_a_killed_worker_fails_the_model_and_its_requests(tiny_dir):
    engine = LLMEngine.from_model_dir(tiny_dir, model_name="tiny-tp", config=EngineConfig(
        device="cpu", num_kv_blocks=64, tensor_parallel_size=2))
    (worker,) = engine.tp.pids

    async def scenario():
        aeng = AsyncLLMEngine(engine)
        outputs = 0
        started = time.monotonic()
        with pytest.raises(EngineDeadError) as err:
            async for _out in aeng.generate("long", list(range(1, 20)), SamplingParams(max_tokens=900, ignore_eos=True,
                                                                                     temperature=0.0)):
                outputs += 1
                if outputs == 3:
                    os.kill(worker, signal.SIGKILL)
        assert time.monotonic() - started < 30  # failed promptly, not after a collective timeout
        assert "rank 1" in str(err.value) and "signal 9" in str(err.value)
        assert aeng.is_dead and "rank 1" in aeng.dead_reason
        with pytest.raises(EngineDeadError):
            async for _ in aeng.generate("after", [1, 2, 3], SamplingParams(max_tokens=2)):
                pass
        await aeng.shutdown()

    asyncio.run(scenario())


def test_a_worker_that_dies_while_idle_fails_the_model_at_once(tiny_dir):
    engine = LLMEngine.from_model_dir(tiny_dir, model_name="tiny-tp", config=EngineConfig(
        device="cpu", num_kv_blocks=64, tensor_parallel_size=2))
    (worker,) = engine.tp.pids

    async def scenario():
        aeng = AsyncLLMEngine(engine)
        assert aeng.is_running
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not aeng.is_dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert aeng.is_dead and "rank 1" in aeng.dead_reason and "signal 9" in aeng.dead_reason
        await aeng.shutdown()

    asyncio.run(scenario())
