"""Logprobs against Hugging Face's log_softmax, and the defining property of each logits processor."""

from __future__ import annotations

import random

import pytest
import torch
from kubeinfer_serving.engine.sampler import apply_min_p
from kubeinfer_serving.engine.sampling import SamplingParams

from tests.engine.conftest import Req, run_workload, tokens_of


def _prompt(seed: int, n: int = 20) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, 8192) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_logprobs(tiny_dir):
    """Function token ids -> [len, V] float32 log_softmax of Hugging Face's logits at each position."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return run


def _lp(make_engine, reqs, params, **cfg):
    cfg.setdefault("num_kv_blocks", 64)
    return run_workload(make_engine(**cfg), reqs, params=params)


def test_output_and_prompt_logprobs_match_hf_log_softmax(make_engine, hf_logprobs):
    prompts = {f"r{i}": _prompt(i, 10 + 23 * i) for i in range(3)}
    reqs = [Req(rid, p, 6, i) for i, (rid, p) in enumerate(prompts.items())]
    # A small token budget prefills the longer prompts in chunks: prompt logprobs must span them.
    outs = _lp(make_engine, reqs, lambda r: SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                                                           prompt_logprobs=2), max_num_batched_tokens=24)
    for rid, prompt in prompts.items():
        out = outs[rid]
        tokens = tokens_of(out)
        ref = hf_logprobs(prompt + tokens)
        entries = [e for o in out for e in o.new_logprobs]
        assert [e.token_id for e in entries] == tokens
        for pos, e in enumerate(entries):
            row = ref[len(prompt) - 1 + pos]
            assert e.logprob == pytest.approx(row[e.token_id].item(), abs=1e-4)
            top_v, top_i = row.topk(3)
            assert [t for t, _ in e.top] == top_i.tolist()
            assert [v for _, v in e.top] == pytest.approx(top_v.tolist(), abs=1e-4)
        plp = out[0].prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for pos in range(1, len(prompt)):
            assert plp[pos].token_id == prompt[pos]
            assert plp[pos].logprob == pytest.approx(ref[pos - 1][prompt[pos]].item(), abs=1e-4)
            assert [t for t, _ in plp[pos].top] == ref[pos - 1].topk(2).indices.tolist()
        assert all(o.prompt_logprobs is None for o in out[1:])


def test_max_tokens_zero_scores_the_prompt_and_outputs_nothing(make_engine, hf_logprobs):
    prompt = _prompt(5, 40)
    engine = make_engine(num_kv_blocks=64)
    # The same prompt twice: the second must not take its logits from the prefix cache.
    outs = run_workload(engine, [Req("a", prompt, 0, 0), Req("b", prompt, 0, 3)],
                        params=lambda r: SamplingParams(max_tokens=0, prompt_logprobs=0))
    ref = hf_logprobs(prompt)
    for rid in "ab":
        (out,) = outs[rid]
        assert out.finished and out.finish_reason == "length" and out.new_token_ids == [] and out.new_text == ""
        assert out.num_output_tokens == 0
        got = [e.logprob for e in out.prompt_logprobs[1:]]
        want = [ref[p - 1][prompt[p]].item() for p in range(1, len(prompt))]
        assert got == pytest.approx(want, abs=1e-4)
    assert engine.stats().num_free_blocks == 64
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_logit_bias_minus_100_bans_and_plus_100_forces_a_token(make_engine):
    prompt = _prompt(11)
    free = tokens_of(_lp(make_engine, [Req("f", prompt, 8, 0)],
                         lambda r: SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))["f"])
    banned = free[0]
    out = tokens_of(_lp(make_engine, [Req("b", prompt, 8, 0)], lambda r: SamplingParams(
        max_tokens=8, temperature=1.5, seed=1, ignore_eos=True, logit_bias={banned: -100.0}))["b"])
    assert banned not in out
    forced = tokens_of(_lp(make_engine, [Req("p", prompt, 8, 0)], lambda r: SamplingParams(
        max_tokens=8, temperature=1.0, seed=2, ignore_eos=True, logit_bias={1234: 100.0}))["p"])
    assert forced == [1234] * 8


def test_allowed_token_ids_and_bad_words(make_engine):
    prompt = _prompt(12)
    allowed = [100, 200, 300]
    out = tokens_of(_lp(make_engine, [Req("a", prompt, 20, 0)], lambda r: SamplingParams(
        max_tokens=20, temperature=2.0, seed=3, ignore_eos=True, allowed_token_ids=allowed))["a"])
    assert set(out) <= set(allowed) and len(out) == 20
    # Only tokens 100/200 allowed; the pair (100, 200) as a bad word: 200 never follows 100 any more.
    def pairs(**kw):
        out = tokens_of(_lp(make_engine, [Req("b", prompt, 40, 0)], lambda r: SamplingParams(
            max_tokens=40, temperature=5.0, seed=4, ignore_eos=True, allowed_token_ids=[100, 200], **kw))["b"])
        return list(zip(out, out[1:], strict=False))

    assert (100, 200) in pairs()
    banned = pairs(bad_words_token_ids=[[100, 200]])
    assert banned and (100, 200) not in banned
    assert all(200 not in p for p in pairs(bad_words_token_ids=[[200]]))


def test_min_tokens_blocks_eos_until_reached(make_engine):
    prompt = _prompt(13)
    engine = make_engine(num_kv_blocks=64)
    eos = min(engine.eos_token_ids)
    # logit_bias forces EOS at once; min_tokens must hold it back for 5 tokens.
    outs = run_workload(engine, [Req("m", prompt, 20, 0), Req("n", prompt, 20, 0)], params=lambda r: SamplingParams(
        max_tokens=20, temperature=0, logit_bias={eos: 100.0}, min_tokens=5 if r.request_id == "m" else 0))
    m, n = tokens_of(outs["m"]), tokens_of(outs["n"])
    assert n == [eos] and outs["n"][-1].finish_reason == "stop"
    assert len(m) == 6 and eos not in m[:5] and m[5] == eos and outs["m"][-1].finish_reason == "stop"


def test_penalties_give_the_distribution_of_their_definition(make_engine, tiny_dir):
    """Each step's processed log-probabilities equal HF's logits penalised by hand (vLLM's definitions)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompt = _prompt(14, 8) + [103, 107]  # two allowed tokens in the prompt: repetition_penalty covers them
    allowed = list(range(100, 120))
    pres, freq, rep = 0.7, 0.4, 1.8
    outs = _lp(make_engine, [Req("g", prompt, 16, 0)], lambda r: SamplingParams(
        max_tokens=16, temperature=1.0, seed=7, ignore_eos=True, allowed_token_ids=allowed, presence_penalty=pres,
        frequency_penalty=freq, repetition_penalty=rep, logprobs=20))["g"]
    out = tokens_of(outs)
    entries = [e for o in outs for e in o.new_logprobs]
    assert len(set(out)) < len(out)  # some tokens repeat, so the counts matter
    with torch.inference_mode():
        raw = hf(torch.tensor([prompt + out])).logits[0].float()
    for i, e in enumerate(entries):
        x = raw[len(prompt) - 1 + i, allowed].clone()
        seen = set(prompt) | set(out[:i])
        for j, t in enumerate(allowed):
            if t in seen:
                x[j] = x[j] / rep if x[j] > 0 else x[j] * rep
            count = out[:i].count(t)
            x[j] -= freq * count + pres * (count > 0)
        want = dict(zip(allowed, x.log_softmax(-1).tolist(), strict=True))
        got = dict(e.top)
        assert set(got) == set(allowed)
        assert all(got[t] == pytest.approx(want[t], abs=1e-4) for t in allowed), i
        assert e.logprob == pytest.approx(want[e.token_id], abs=1e-4)


def test_penalty_logits_match_the_definition():
    from kubeinfer_serving.engine.logits_processors import apply_logits_processors
    from kubeinfer_serving.engine.sequence import Sequence

    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    seqs = [
        Sequence("a", [1, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)),
        Sequence("b", [1, 2], SamplingParams()),
        Sequence("c", [1, 2], SamplingParams(repetition_penalty=2.0)),
    ]
    seqs[0].output_token_ids = [3, 3, 4]
    seqs[2].output_token_ids = [5]
    out = apply_logits_processors(logits.clone(), seqs)
    want = logits.clone()
    want[0, 3] -= 0.5 + 2 * 0.25
    want[0, 4] -= 0.5 + 0.25
    for t in (1, 2, 5):
        want[2, t] = want[2, t] / 2 if want[2, t] > 0 else want[2, t] * 2
    assert torch.allclose(out, want)


def test_min_p_keeps_tokens_above_the_fraction_of_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, torch.tensor([0.5, 0.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]  # 0.3 >= 0.25 > 0.15
    assert torch.isfinite(out[1]).all()


def test_min_p_in_the_engine_restricts_hot_sampling(make_engine):
    prompt = _prompt(15)
    outs = _lp(make_engine, [Req("h", prompt, 30, 0)], lambda r: SamplingParams(
        max_tokens=30, temperature=1.0, seed=5, ignore_eos=True, min_p=1.0, logprobs=1))["h"]
    # min_p = 1 keeps only the most likely token: every pick is the top-1 of its step.
    for e in (e for o in outs for e in o.new_logprobs):
        assert e.token_id == e.top[0][0]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_p": 1.5}, "min_p"), ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
])
def test_invalid_processor_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_token_ids_in_params_outside_the_vocabulary_are_refused(make_engine):
    engine = make_engine(num_kv_blocks=8)
    with pytest.raises(ValueError, match="token id 1000000 is outside the vocabulary") as refused:
        engine.validate([7, 8], SamplingParams(logit_bias={10**6: 1.0}))
    assert refused.value.param == "logit_bias"  # the field at fault, for OpenAI's error body
