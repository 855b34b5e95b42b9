"""Scheduler decisions without a model: budgets, joins and leaves, chunked prefill, preemption."""

from __future__ import annotations

from kubeinfer_serving.engine.block_manager import BlockManager
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.engine.scheduler import Scheduler
from kubeinfer_serving.engine.sequence import Sequence


def _seq(rid: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    start = 1000 * sum(map(ord, rid))  # distinct prompts: no prefix-cache hits between sequences
    return Sequence(rid, list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens))


def _finish_step(sched: Scheduler, plan) -> list[str]:
    """Pretend the model ran and sampled token 1 wherever a chunk reaches its sequence's end;
    the scheduler applies the result. Returns the ids that finished."""
    sampled = [1 if item.samples else None for item in plan.scheduled]
    return [u.seq.request_id for u in sched.update_from_output(plan, sampled) if u.finish_reason is not None]


def test_update_from_output_applies_stop_ids_max_tokens_and_max_model_len():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=7)
    stops = _seq("s", 3, max_tokens=10)
    stops.stop_token_ids = frozenset({99})
    short = _seq("m", 3, max_tokens=2)
    capped = _seq("c", 5, max_tokens=10)
    chunk = _seq("p", 30, max_tokens=10)
    for seq in (stops, short, capped):
        sched.add(seq)
    plan = sched.schedule()
    updates = sched.update_from_output(plan, [99, 5, 5])
    assert [(u.seq.request_id, u.token, u.finish_reason) for u in updates] == [("s", 99, "stop"), ("m", 5, None),
                                                                               ("c", 5, None)]
    assert stops.is_finished and stops.block_table == [] and stops.output_token_ids == [99]
    plan = sched.schedule()
    updates = sched.update_from_output(plan, [6, 6])
    # "m" reached max_tokens=2; "c" reached 7 tokens = max_model_len
    assert [(u.seq.request_id, u.finish_reason) for u in updates] == [("m", "length"), ("c", "length")]
    assert not sched.has_unfinished()
    # a prefill chunk short of the prompt's end: computed tokens advance, no token, no update
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    sched.add(chunk)
    plan = sched.schedule()
    assert sched.update_from_output(plan, [None]) == []
    assert chunk.num_computed_tokens == 16 and chunk.output_token_ids == []
    assert len(chunk.block_hashes) == 4  # the four full blocks went into the prefix cache


def test_token_budget_chunks_long_prompts_and_decodes_go_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a = _seq("a", 3, max_tokens=10)
    sched.add(a)
    _finish_step(sched, sched.schedule())  # a prefilled, now decoding
    sched.add(_seq("long", 40))
    plan = sched.schedule()
    # a decodes one token first, the long prompt gets the rest of the 16-token budget.
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("long", 15)]
    assert plan.num_batched_tokens == 16
    _finish_step(sched, plan)
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("long", 15)]
    assert not plan.scheduled[1].samples
    _finish_step(sched, plan)
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("long", 10)]
    assert plan.scheduled[1].samples  # the last chunk samples the first output token


def test_max_num_seqs_caps_the_batch_and_finished_sequences_leave_at_once():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    for i, n in enumerate([1, 3, 2]):
        sched.add(_seq(f"r{i}", 5, max_tokens=n))
    plan = sched.schedule()
    assert {s.seq.request_id for s in plan.scheduled} == {"r0", "r1"} and len(sched.waiting) == 1
    assert _finish_step(sched, plan) == ["r0"]  # r0 leaves after its single token...
    assert all(bm.ref_counts[b] == 0 for b in range(64) if b not in sched.running[0].block_table)
    plan = sched.schedule()  # ...and r2 joins the very next step, next to decoding r1
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("r1", 1), ("r2", 5)]
    while sched.has_unfinished():
        _finish_step(sched, sched.schedule())
    assert bm.num_free_blocks == 64


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = _seq("old", 4, max_tokens=8), _seq("new", 4, max_tokens=8)
    sched.add(old)
    sched.add(new)
    _finish_step(sched, sched.schedule())  # both prefilled, one block each; decoding needs more
    sched.add(_seq("queued", 2))
    preempted = []
    for _ in range(8):
        plan = sched.schedule()
        preempted += [s.request_id for s in plan.preempted]
        if plan.preempted:
            assert all(s.seq is not new for s in plan.scheduled)
            assert sched.waiting[0] is new  # back at the front, ahead of "queued"
            assert new.num_computed_tokens == 0 and new.block_table == []
            break
        _finish_step(sched, plan)
    assert preempted == ["new"]
    while sched.has_unfinished():
        _finish_step(sched, sched.schedule())
    assert bm.num_free_blocks == 4
    assert old.num_output_tokens == new.num_output_tokens == 8


def test_abort_of_a_waiting_or_running_sequence_frees_its_blocks():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    run, wait = _seq("run", 9), _seq("wait", 9)
    sched.add(run)
    sched.add(wait)
    _finish_step(sched, sched.schedule())
    assert bm.num_free_blocks < 16
    sched.finish(wait, "abort")
    sched.finish(run, "abort")
    assert bm.num_free_blocks == 16 and not sched.has_unfinished()
    assert run.finish_reason == wait.finish_reason == "abort"
