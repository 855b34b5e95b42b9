"""Multi-LoRA batching in the engine against PEFT's merged models (CPU, plain torch ops)."""

from __future__ import annotations

import random

import pytest
from kubeinfer_serving.engine.sampling import SamplingParams

from tests.lora.peft_adapters import SPECS, greedy, log_softmax

NAMES = [s.name for s in SPECS]


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, 8192) for _ in range(n)]


def _run(engine, reqs, params=None):
    """reqs: (request id, prompt, adapter or None, max_tokens, arrival step). Returns id -> outputs."""
    pending = sorted(reqs, key=lambda r: r[4])
    outs = {r[0]: [] for r in reqs}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][4] <= step:
            rid, prompt, lora, n, _ = pending.pop(0)
            p = params(n) if params else SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            engine.add_request(rid, prompt, p, lora=lora)
        for o in engine.step():
            outs[o.request_id].append(o)
        step += 1
        assert step < 5000, "engine made no progress"
    return outs


def _tokens(outs):
    return [t for o in outs for t in o.new_token_ids]


def test_greedy_output_equals_peft_merged_model_for_every_adapter(lora_engine, peft_models):
    engine = lora_engine(max_num_batched_tokens=32)  # 40- and 70-token prompts prefill in chunks
    prompts = [_prompt(10, 7), _prompt(11, 40), _prompt(12, 70)]
    reqs = [(f"{name}-{i}", p, name, 12, 0) for name in NAMES for i, p in enumerate(prompts)]
    outs = _run(engine, reqs)
    for name in NAMES:
        for i, p in enumerate(prompts):
            assert _tokens(outs[f"{name}-{i}"]) == greedy(peft_models(name), p, 12), f"{name} prompt {i}"


def test_adapters_change_the_output(lora_engine, peft_models):
    engine = lora_engine()
    prompt = _prompt(20, 16)
    outs = _run(engine, [(str(n), prompt, n, 12, 0) for n in [None, *NAMES]])
    seqs = {tuple(_tokens(o)) for o in outs.values()}
    assert len(seqs) == len(NAMES) + 1, "every adapter (and the base) gives its own output"
    assert _tokens(outs["None"]) == greedy(peft_models(None), prompt, 12)


def test_a_batch_mixing_base_and_three_adapters_equals_each_run_alone(lora_engine):
    engine = lora_engine(max_num_batched_tokens=48, max_num_seqs=16)
    rng = random.Random(5)
    mix = [None, NAMES[0], NAMES[1], NAMES[2]]
    reqs = [(f"r{i}", _prompt(100 + i, rng.choice([3, 17, 33, 60])), mix[i % 4], rng.randint(4, 14), rng.randint(0, 6))
            for i in range(16)]
    mixed = _run(engine, reqs)
    # The batch really mixed them: check the engine ran steps holding all four at once.
    alone_engine = lora_engine(enable_prefix_caching=False)
    for rid, prompt, lora, n, _ in reqs:
        alone = _run(alone_engine, [(rid, prompt, lora, n, 0)])
        assert _tokens(mixed[rid]) == _tokens(alone[rid]), f"{rid} ({lora})"
        assert len(_tokens(alone[rid])) == n


def test_steps_really_mix_adapters(lora_engine):
    engine = lora_engine()
    mix = [None, NAMES[0], NAMES[1], NAMES[2]]
    for i, lora in enumerate(mix):
        engine.add_request(f"m{i}", _prompt(200 + i, 9), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           lora=lora)
    engine.step()
    assert {s.lora.name if s.lora else None for s in engine.scheduler.running} == set(mix)
    assert sorted(engine.lora.resident()) == sorted(mix[1:])


def test_logprobs_within_1e_4_of_peft(lora_engine, peft_models):
    engine = lora_engine(max_num_batched_tokens=24)
    prompts = {name: _prompt(300 + i, 10 + 13 * i) for i, name in enumerate(NAMES)}
    outs = _run(engine, [(name, p, name, 6, i) for i, (name, p) in enumerate(prompts.items())],
                params=lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=3,
                                                prompt_logprobs=2))
    for name, prompt in prompts.items():
        out = outs[name]
        tokens = _tokens(out)
        ref = log_softmax(peft_models(name), prompt + tokens)
        entries = [e for o in out for e in o.new_logprobs]
        assert [e.token_id for e in entries] == tokens
        for pos, e in enumerate(entries):
            row = ref[len(prompt) - 1 + pos]
            assert e.logprob == pytest.approx(row[e.token_id].item(), abs=1e-4)
            top_v, top_i = row.topk(3)
            assert [t for t, _ in e.top] == top_i.tolist()
            assert [v for _, v in e.top] == pytest.approx(top_v.tolist(), abs=1e-4)
        plp = out[0].prompt_logprobs
        for pos in range(1, len(prompt)):
            assert plp[pos].logprob == pytest.approx(ref[pos - 1][prompt[pos]].item(), abs=1e-4)


def test_more_adapters_than_slots_all_answered_by_their_own_adapter(lora_engine, peft_models):
    engine = lora_engine(max_loras=2)
    prompt = _prompt(400, 12)
    reqs = [(f"{name}-{k}", prompt, name, 6 + k, k) for k in range(3) for name in NAMES]
    outs = _run(engine, reqs)
    for rid, _, name, n, _ in reqs:
        assert _tokens(outs[rid]) == greedy(peft_models(name), prompt, n), rid
    assert engine.lora.num_loads > 2 and engine.lora.num_evictions == engine.lora.num_loads - 2
    assert engine.lora.running_counts() == {}


def test_prefix_cache_never_shares_blocks_across_adapters(lora_engine, peft_models):
    engine = lora_engine()
    prompt = _prompt(500, 40)  # two full 16-token blocks are cacheable
    order = [None, NAMES[0], NAMES[1], NAMES[0], None]
    cached = []
    for i, lora in enumerate(order):
        out = _run(engine, [(f"c{i}", prompt, lora, 5, 0)])[f"c{i}"]
        cached.append(out[-1].num_cached_tokens)
        assert _tokens(out) == greedy(peft_models(lora), prompt, 5)
    assert cached == [0, 0, 0, 32, 32]


def test_unknown_adapter_is_refused(lora_engine):
    engine = lora_engine()
    with pytest.raises(ValueError, match="not loaded"):
        engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=2), lora="nope")
    assert not engine.has_unfinished_requests()


def test_preemption_and_abort_release_adapter_slots(lora_engine, peft_models):
    # 10 blocks of 16 tokens for 8 requests of ~45 tokens: sequences are preempted and recomputed.
    engine = lora_engine(num_kv_blocks=10, max_loras=2, max_num_seqs=8)
    prompt = _prompt(600, 30)
    reqs = [(f"p{i}", prompt, [None, *NAMES][i % 5], 15, 0) for i in range(8)]
    outs = _run(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    for rid, _, name, n, _ in reqs:
        assert _tokens(outs[rid]) == greedy(peft_models(name), prompt, n), rid
    assert engine.lora.running_counts() == {}
    engine.add_request("gone", prompt, SamplingParams(max_tokens=20, ignore_eos=True), lora=NAMES[0])
    engine.step()
    assert engine.lora.running_counts() == {NAMES[0]: 1}
    engine.abort_request("gone")
    assert engine.lora.running_counts() == {} and not engine.has_unfinished_requests()


def test_a_request_waits_for_a_slot_and_the_gauges_say_so(lora_engine):
    from kubeinfer_serving import metrics

    engine = lora_engine(max_loras=1)
    engine.add_stat_logger(metrics.EngineMetrics("tiny-lora-gauges"))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("a", _prompt(700, 5), params, lora=NAMES[0])
    engine.add_request("b", _prompt(701, 5), params, lora=NAMES[1])
    engine.add_request("base", _prompt(702, 5), params)
    engine.step()
    # One slot: b waits behind a's adapter while the base request, queued after it, runs.
    assert {s.request_id for s in engine.scheduler.running} == {"a", "base"}
    stats = engine.last_step_stats
    assert (stats.lora_running, stats.lora_waiting) == ({NAMES[0]: 1}, {NAMES[1]: 1})

    def gauge(name, lora):
        return metrics.REGISTRY.get_sample_value(name, {"model_name": "tiny-lora-gauges", "lora_name": lora})

    assert gauge("kubeinfer_lora_requests_running", NAMES[0]) == 1
    assert gauge("kubeinfer_lora_requests_waiting", NAMES[1]) == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert gauge("kubeinfer_lora_requests_running", NAMES[1]) == 0
    assert gauge("kubeinfer_lora_requests_waiting", NAMES[1]) == 0
    assert metrics.REGISTRY.get_sample_value("kubeinfer_lora_slot_evictions_total",
                                             {"model_name": "tiny-lora-gauges"}) == 1
