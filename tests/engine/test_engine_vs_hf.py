"""Greedy decoding through the engine equals Hugging Face ``generate`` token for token."""

from __future__ import annotations

import random

import pytest
import torch
from kubeinfer_serving import metrics
from kubeinfer_serving.engine.sampling import SamplingParams

from tests.engine.conftest import Req, run_workload, tokens_of


def _assert_matches_hf(outs, reqs, hf_greedy):
    for r in reqs:
        got = tokens_of(outs[r.request_id])
        assert got == hf_greedy(r.prompt, r.max_tokens), f"{r.request_id} (prompt {len(r.prompt)} tokens) differs"
        final = outs[r.request_id][-1]
        assert final.finished and final.finish_reason == "length"
        assert final.num_output_tokens == r.max_tokens == len(got)
        assert all(not o.finished for o in outs[r.request_id][:-1])


def test_staggered_requests_match_hf_as_batch_changes(make_engine, workload, hf_greedy):
    engine = make_engine(max_num_seqs=12, max_num_batched_tokens=64, num_kv_blocks=200)
    batches: list[set[str]] = []

    def record(eng, _results):
        batches.append({s.request_id for s in eng.scheduler.running})

    outs = run_workload(engine, workload, on_step=record)
    _assert_matches_hf(outs, workload, hf_greedy)
    # The batch really changed while requests ran: some request joined a batch in which
    # another was already running, and some left while others went on.
    joined_mid_flight = any(b - a and a & b for a, b in zip(batches, batches[1:], strict=False))
    left_mid_flight = any(a - b and a & b for a, b in zip(batches, batches[1:], strict=False))
    assert joined_mid_flight and left_mid_flight
    assert max(len(b) for b in batches) > 4
    # Prompts longer than the 64-token step budget were prefilled in chunks.
    assert any(len(r.prompt) > 64 for r in workload)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0


def test_preemption_under_a_small_kv_pool_keeps_outputs_equal(make_engine, workload, hf_greedy):
    # 14 blocks x 16 tokens = 224 tokens of KV for 36 requests of up to 190 tokens each.
    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=96, num_kv_blocks=14)
    before = metrics.REGISTRY.get_sample_value("kubeinfer_num_preemptions_total", {"model_name": "tiny-test"}) or 0
    outs = run_workload(engine, workload)
    assert engine.scheduler.num_preemptions > 0
    after = metrics.REGISTRY.get_sample_value("kubeinfer_num_preemptions_total", {"model_name": "tiny-test"})
    assert after - before == engine.scheduler.num_preemptions
    _assert_matches_hf(outs, workload, hf_greedy)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks == 14


def test_prefix_cache_hits_give_the_same_tokens(make_engine, hf_greedy):
    rng = random.Random(7)
    shared = [rng.randrange(6, 8192) for _ in range(70)]
    reqs = [Req(f"p{i}", shared + [rng.randrange(6, 8192) for _ in range(i + 1)], 12, 0) for i in range(4)]
    reqs.append(Req("same-as-p0", list(reqs[0].prompt), 12, 0))
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=64)
    hits_before = metrics.REGISTRY.get_sample_value("kubeinfer_prefix_cache_hits_total", {"model_name": "tiny-test"}) or 0
    outs = {}
    for r in reqs:  # one after another, so each finds its predecessors' blocks in the cache
        outs.update(run_workload(engine, [r]))
    _assert_matches_hf(outs, reqs, hf_greedy)
    assert outs["p0"][-1].num_cached_tokens == 0
    # 70 shared tokens = 4 full blocks of 16 (64 tokens) reusable by the others.
    assert all(outs[f"p{i}"][-1].num_cached_tokens == 64 for i in range(1, 4))
    assert outs["same-as-p0"][-1].num_cached_tokens == 64  # (71 - 1) // 16 full blocks, last token recomputed
    hits = metrics.REGISTRY.get_sample_value("kubeinfer_prefix_cache_hits_total", {"model_name": "tiny-test"})
    assert hits - hits_before == 4 * 64


def test_prefix_caching_off_gives_the_same_tokens(make_engine, workload, hf_greedy):
    reqs = workload[:12]
    engine = make_engine(max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=40, enable_prefix_caching=False)
    outs = run_workload(engine, reqs)
    _assert_matches_hf(outs, reqs, hf_greedy)
    assert all(o[-1].num_cached_tokens == 0 for o in outs.values())


def test_long_prompt_is_prefilled_in_chunks_within_the_budget(make_engine, hf_greedy):
    prompt = [random.Random(3).randrange(6, 8192) for _ in range(300)]
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=64)
    engine.add_request("long", prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    chunk_sizes, outs = [], []
    while engine.has_unfinished_requests():
        plan_tokens_before = engine.scheduler.running[0].num_computed_tokens if engine.scheduler.running else 0
        res = engine.step()
        outs += res
        seq_tokens = engine.scheduler.running[0].num_computed_tokens if engine.scheduler.running else None
        if seq_tokens is not None:
            chunk_sizes.append(seq_tokens - plan_tokens_before)
    assert chunk_sizes[:9] == [32] * 9 and chunk_sizes[9] == 12  # 300 = 9 x 32 + 12, then decode
    assert tokens_of(outs) == hf_greedy(prompt, 5)


@pytest.mark.cuda
def test_cuda_engine_matches_hf_in_float32_and_runs_in_bfloat16(make_engine, workload, tiny_dir):
    from transformers import LlamaForCausalLM

    reqs = workload[:10]
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None
    engine = make_engine(device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=64)
    outs = run_workload(engine, reqs)
    for r in reqs:
        ref = hf.generate(torch.tensor([r.prompt], device="cuda"), max_new_tokens=r.max_tokens, do_sample=False)
        assert tokens_of(outs[r.request_id]) == ref[0, len(r.prompt):].tolist()
    bf16 = make_engine(device="cuda", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=64)
    assert bf16.dtype == torch.bfloat16
    outs = run_workload(bf16, reqs)
    assert all(len(tokens_of(outs[r.request_id])) == r.max_tokens for r in reqs)
    assert bf16.stats().num_free_blocks == 64
