"""One bad request fails alone (D1), bursts are not shed with free batch slots (D9), corrupt weights
are refused (D17), and the priority scheduling policy (admission order, preemption of low priority)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from kubeinfer_serving import metrics
from kubeinfer_serving.engine.async_engine import AsyncLLMEngine
from kubeinfer_serving.engine.block_manager import BlockManager
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.errors import QueueFullError
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.engine.scheduler import Scheduler
from kubeinfer_serving.engine.sequence import Sequence
from kubeinfer_serving.models.llama import WeightLoadError

from tests.engine.test_scheduler import _finish_step


def _broken_params() -> SamplingParams:
    """Valid parameters turned into ones torch cannot build a tensor from (a fault while sampling)."""
    params = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9)
    params.top_p = "not a number"  # bypasses validation, as a bug upstream could
    return params


async def _collect(engine, rid, prompt, params):
    return [o async for o in engine.generate(rid, prompt, params)]


def test_a_sampling_fault_fails_only_that_request(make_engine):
    engine = make_engine(num_kv_blocks=64)
    good = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("good", [7, 8, 9], good)
    engine.add_request("bad", [7, 8, 10], _broken_params())
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    bad = [o for o in outs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finished and bad[0].finish_reason == "error" and bad[0].error
    good_out = [o for o in outs if o.request_id == "good"]
    assert good_out[-1].finish_reason == "length" and good_out[-1].num_output_tokens == 6
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


async def test_async_engine_survives_a_bad_request(make_engine):
    eng = AsyncLLMEngine(make_engine(num_kv_blocks=64))
    try:
        good = [asyncio.ensure_future(_collect(eng, f"g{i}", [7, 8, 9 + i],
                                               SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)))
                for i in range(4)]
        from kubeinfer_serving.engine.errors import RequestFailedError

        with pytest.raises(RequestFailedError):
            await _collect(eng, "bad", [7, 8, 20], _broken_params())
        for task in good:
            outs = await task
            assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 16
        assert eng.is_running and not eng.is_dead
        outs = await _collect(eng, "after", [7, 8], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert outs[-1].finished and outs[-1].num_output_tokens == 2
    finally:
        await eng.shutdown()


async def test_a_crashed_loop_marks_the_engine_dead(make_engine):
    eng = AsyncLLMEngine(make_engine(num_kv_blocks=64))
    try:
        def boom():
            raise RuntimeError("scheduler bug")

        eng.engine.scheduler.schedule = boom  # a fault outside any one request
        with pytest.raises(Exception):  # noqa: B017 - EngineDeadError reaches the caller
            await _collect(eng, "x", [7, 8], SamplingParams(max_tokens=2))
        for _ in range(100):
            if eng.is_dead:
                break
            await asyncio.sleep(0.02)
        assert eng.is_dead
    finally:
        await eng.shutdown()


async def test_d9_a_burst_that_fits_the_batch_is_admitted(make_engine):
    eng = AsyncLLMEngine(make_engine(num_kv_blocks=128, max_num_seqs=8, max_waiting_requests=1))
    try:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        results = await asyncio.gather(*(_collect(eng, f"b{i}", [7, 8, 9 + i], params) for i in range(9)),
                                       return_exceptions=True)
        # 8 batch slots + 1 waiting: all nine are served, none is refused.
        assert not any(isinstance(r, BaseException) for r in results), results
        with pytest.raises(QueueFullError):
            await asyncio.gather(*(_collect(eng, f"c{i}", [7, 8, 9 + i], params) for i in range(40)))
    finally:
        await eng.shutdown()


def test_d17_non_finite_weights_are_refused(tiny):
    hf_config, weights, tokenizer = tiny
    corrupt = dict(weights)
    name = next(n for n in corrupt if n.endswith("mlp.up_proj.weight"))
    bad = corrupt[name].clone()
    bad.view(-1)[:1000] = float("nan")
    corrupt[name] = bad
    with pytest.raises(WeightLoadError, match="NaN or infinite"):
        LLMEngine.from_weights(hf_config, corrupt.items(), tokenizer=tokenizer,
                               config=EngineConfig(device="cpu", num_kv_blocks=8))


async def test_d18_a_request_cut_before_admission_is_counted(make_engine):
    import threading

    eng = AsyncLLMEngine(make_engine(num_kv_blocks=64))
    counter = metrics.REQUESTS_FINISHED.labels(model_name="tiny-test", finish_reason="abort")
    gate = threading.Event()
    real_step = eng.engine.step

    def held_step():  # keeps the loop thread busy, away from its inbox, until the gate opens
        gate.wait(10)
        return real_step()

    eng.engine.step = held_step
    try:
        busy = asyncio.ensure_future(_collect(eng, "busy", [7, 8], SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.2)  # the loop thread is now inside held_step
        before = counter._value.get()
        gen = eng.generate("cut", [7, 8], SamplingParams(max_tokens=4))
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await busy
        for _ in range(100):
            if counter._value.get() > before:
                break
            await asyncio.sleep(0.02)
        assert counter._value.get() == before + 1
    finally:
        gate.set()
        await eng.shutdown()


# ------------------------------------------------------------------ priority policy
def _pseq(rid: str, prompt_len: int, priority: int, arrival: float, max_tokens: int = 4) -> Sequence:
    start = 1000 * sum(map(ord, rid))
    return Sequence(rid, list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens,
                                                                                  priority=priority),
                    arrival_time=arrival)


def test_priority_policy_admits_lower_values_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64, policy="priority")
    for rid, prio, t in (("low", 5, 1.0), ("high", -1, 2.0), ("mid", 0, 3.0), ("mid2", 0, 4.0)):
        sched.add(_pseq(rid, 4, prio, t, max_tokens=1))
    order = []
    while sched.has_unfinished():
        order += _finish_step(sched, sched.schedule())
    assert order == ["high", "mid", "mid2", "low"]


def test_fcfs_policy_keeps_arrival_order():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64)
    for rid, t in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        sched.add(_pseq(rid, 4, 0, t, max_tokens=1))
    order = []
    while sched.has_unfinished():
        order += _finish_step(sched, sched.schedule())
    assert order == ["a", "b", "c"]


def test_priority_policy_preempts_the_lowest_priority_first():
    # 6 blocks of 4 tokens; three 8-token prompts fill them, so decoding needs a preemption.
    sched = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=64, policy="priority")
    seqs = {rid: _pseq(rid, 8, prio, t, max_tokens=8) for rid, prio, t in
            (("important", 0, 3.0), ("unimportant", 9, 1.0), ("normal", 1, 2.0))}
    for s in seqs.values():
        sched.add(s)
    _finish_step(sched, sched.schedule())  # all three prefilled (6 blocks)
    plan = sched.schedule()  # decoding needs new blocks: someone is preempted
    assert plan.preempted and plan.preempted[0].request_id == "unimportant"
    # FCFS would have preempted the newest arrival ("important") instead.
    fcfs = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=64)
    for rid, prio, t in (("unimportant", 0, 1.0), ("normal", 0, 2.0), ("important", 0, 3.0)):
        fcfs.add(_pseq(rid, 8, prio, t, max_tokens=8))
    _finish_step(fcfs, fcfs.schedule())
    assert fcfs.schedule().preempted[0].request_id == "important"


def test_priority_needs_the_priority_policy(make_engine):
    engine = make_engine(num_kv_blocks=16)
    with pytest.raises(ValueError, match="priority scheduling policy"):
        engine.validate([7, 8], SamplingParams(priority=3))
    make_engine(num_kv_blocks=16, scheduling_policy="priority").validate([7, 8], SamplingParams(priority=3))


def test_top_k_beyond_the_vocabulary_samples(make_engine):
    engine = make_engine(num_kv_blocks=16)
    engine.add_request("k", [7, 8], SamplingParams(max_tokens=3, temperature=1.0, top_k=2**31 - 1, seed=1))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finish_reason in ("length", "stop") and outs[-1].error is None
    assert torch.is_tensor(torch.tensor([1]))


# ------------------------------------------------------------------ cache salt
def _cached_tokens(engine, rid: str, prompt: list[int], salt: str | None) -> int:
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0, cache_salt=salt))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs[-1].num_cached_tokens


def test_cache_salt_separates_prefix_cache_hits(make_engine):
    engine = make_engine(num_kv_blocks=64, block_size=16)
    prompt = list(range(100, 164))  # 4 full blocks
    assert _cached_tokens(engine, "a1", prompt, "tenant-a") == 0
    assert _cached_tokens(engine, "b1", prompt, "tenant-b") == 0  # another salt: no hit
    assert _cached_tokens(engine, "u1", prompt, None) == 0  # unsalted: no hit on salted blocks
    assert _cached_tokens(engine, "a2", prompt, "tenant-a") == 48  # same salt: hits (all but the last block)
    assert _cached_tokens(engine, "u2", prompt, None) == 48


class _FaultyMatcher:
    """A grammar matcher (the protocol of ``SamplingParams.guide``) that raises at ``fault``."""

    def __init__(self, vocab_size: int, fault: str) -> None:
        self.words = (vocab_size + 31) // 32
        self.fault = fault

    def compute_bitmask(self) -> bytes:
        if self.fault == "compute_bitmask":
            raise RuntimeError("matcher bug while masking")
        return b"\xff" * (4 * self.words)

    def consume_token(self, token: int) -> bool:
        if self.fault == "consume_token":
            raise RuntimeError("matcher bug while advancing")
        self.consumed = getattr(self, "consumed", 0) + 1
        return not self.is_error()

    def is_stopped(self) -> bool:
        return self.is_error()  # as llguidance's: a failed matcher is also stopped

    def is_error(self) -> bool:
        return self.fault == "limit" and getattr(self, "consumed", 0) >= 3

    def get_error(self) -> str:
        return "parser error: Too many items (limit 50000)\n<state>..." if self.is_error() else ""


class _FaultyGuide:
    def __init__(self, vocab_size: int, fault: str) -> None:
        self.vocab_size, self.fault = vocab_size, fault

    def matcher(self) -> _FaultyMatcher:
        return _FaultyMatcher(self.vocab_size, self.fault)


@pytest.mark.parametrize("fault", ["compute_bitmask", "consume_token"])
def test_a_faulty_grammar_fails_only_that_request(make_engine, fault):
    """Issue 11's structured outputs under issue 12's rule: a processor that raises fails its request alone."""
    engine = make_engine(num_kv_blocks=64)
    good = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, presence_penalty=0.5, logit_bias={5: 1.0})
    engine.add_request("good", [7, 8, 9], good)
    engine.add_request("bad", [7, 8, 10], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                         guide=_FaultyGuide(engine.vocab_size, fault)))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    bad = [o for o in outs if o.request_id == "bad"]
    assert bad[-1].finished and bad[-1].finish_reason == "error" and bad[-1].error
    assert sum(o.finished for o in bad) == 1
    good_out = [o for o in outs if o.request_id == "good"]
    assert good_out[-1].finish_reason == "length" and good_out[-1].num_output_tokens == 6
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_a_grammar_that_fails_mid_generation_ends_with_an_error_not_stop(make_engine):
    """Issue 24 E20: llguidance's limits can trip after a few tokens; the request must fail, not claim "stop"."""
    engine = make_engine(num_kv_blocks=64)
    engine.add_request("g", [7, 8, 9], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                      guide=_FaultyGuide(engine.vocab_size, "limit")))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].finish_reason == "error"
    assert "Too many items" in outs[-1].error and "<state>" not in outs[-1].error
    assert outs[-1].num_output_tokens == 3
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
