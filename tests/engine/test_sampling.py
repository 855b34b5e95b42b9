"""Sampling and stopping as a user sees them: seeds, top-k/top-p, stop strings, limits, aborts."""

from __future__ import annotations

import random

import pytest
import torch
from kubeinfer_serving.engine.errors import PromptTooLongError, QueueFullError
from kubeinfer_serving.engine.sampler import apply_top_k_top_p, sample
from kubeinfer_serving.engine.sampling import SamplingParams

from tests.engine.conftest import Req, run_workload, tokens_of


def _prompt(seed: int, n: int = 20) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, 8192) for _ in range(n)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
     ({"seed": 1.5}, "seed")],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.7]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]  # top-2
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert torch.equal(out[kept], logits[kept])


def test_sampler_greedy_rows_and_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    hot = SamplingParams(temperature=1.0, seed=3)
    alone = sample(logits[1:2], [hot], [torch.Generator().manual_seed(3)])
    batch = sample(logits, [SamplingParams(temperature=0.0), hot, SamplingParams(temperature=2.0)],
                   [None, torch.Generator().manual_seed(3), None])
    assert batch[0].item() == logits[0].argmax().item()
    assert batch[1].item() == alone.item()


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(make_engine):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=200, seed=42, ignore_eos=True)
    prompt = _prompt(1)
    alone = make_engine(num_kv_blocks=64)
    alone_out = tokens_of(run_workload(alone, [Req("x", prompt, 24, 0)], params=lambda r: params)["x"])
    crowd = make_engine(num_kv_blocks=64, max_num_batched_tokens=40)
    others = [Req(f"o{i}", _prompt(100 + i, 5 + 7 * i), 10 + i, i) for i in range(6)]

    def p(r):
        return params if r.request_id == "x" else SamplingParams(max_tokens=r.max_tokens, temperature=1.0,
                                                                 ignore_eos=True)

    crowd_out = tokens_of(run_workload(crowd, [*others, Req("x", prompt, 24, 3)], params=p)["x"])
    assert crowd_out == alone_out
    other_seed = tokens_of(run_workload(alone, [Req("y", prompt, 24, 0)], params=lambda r: SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.95, top_k=200, seed=43, ignore_eos=True))["y"])
    assert other_seed != alone_out


def test_top_k_one_is_greedy(make_engine, hf_greedy):
    prompt = _prompt(2)
    engine = make_engine(num_kv_blocks=32)
    out = run_workload(engine, [Req("k1", prompt, 10, 0)], params=lambda r: SamplingParams(
        max_tokens=10, temperature=1.3, top_k=1, ignore_eos=True))
    assert tokens_of(out["k1"]) == hf_greedy(prompt, 10)


def test_stop_string_trims_text_and_never_streams_it(make_engine, tiny):
    tokenizer = tiny[2]
    prompt = tokenizer.encode("The cluster scheduler placed the pod on a node with a free GPU and")
    engine = make_engine(num_kv_blocks=64)
    free_run = run_workload(engine, [Req("free", prompt, 40, 0)], params=lambda r: SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True))["free"]
    full_text = "".join(o.new_text for o in free_run)
    assert full_text == tokenizer.decode(tokens_of(free_run), skip_special_tokens=True)
    # A stop string from the middle of that text (3 characters, not at position 0).
    middle = len(full_text) // 2
    stop = full_text[middle:middle + 3]
    expected = full_text[: full_text.index(stop)]
    outs = run_workload(engine, [Req("stopped", prompt, 40, 0)], params=lambda r: SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True, stop=["never-appears-xyz", stop]))["stopped"]
    streamed = "".join(o.new_text for o in outs)
    assert streamed == expected
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert outs[-1].num_output_tokens < 40


def test_stop_token_and_eos_end_the_output(make_engine, hf_greedy):
    prompt = _prompt(5)
    ref = hf_greedy(prompt, 12)
    engine = make_engine(num_kv_blocks=64)
    stop_tok = ref[4]
    out = run_workload(engine, [Req("s", prompt, 12, 0)], params=lambda r: SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=[stop_tok]))["s"]
    got = tokens_of(out)
    assert got == ref[: ref.index(stop_tok) + 1]
    assert out[-1].finish_reason == "stop"
    # The model's EOS ids end generation unless ignore_eos.
    engine.eos_token_ids = frozenset({stop_tok})
    out = run_workload(engine, [Req("e", prompt, 12, 0)], params=lambda r: SamplingParams(
        max_tokens=12, temperature=0))["e"]
    assert tokens_of(out) == ref[: ref.index(stop_tok) + 1] and out[-1].finish_reason == "stop"
    out = run_workload(engine, [Req("i", prompt, 12, 0)], params=lambda r: SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))["i"]
    assert tokens_of(out) == ref and out[-1].finish_reason == "length"


def test_abort_frees_blocks_and_reports_abort(make_engine):
    engine = make_engine(num_kv_blocks=32)
    for i in range(3):
        engine.add_request(f"a{i}", _prompt(10 + i, 40), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.stats().num_free_blocks < 32 and engine.stats().num_running == 3
    final = engine.abort_request("a1")
    assert final.finished and final.finish_reason == "abort" and final.num_output_tokens >= 1
    assert engine.abort_request("a1") is None
    engine.abort_request("a0")
    engine.abort_request("a2")
    stats = engine.stats()
    assert stats.num_free_blocks == 32 and stats.num_running == 0 and not engine.has_unfinished_requests()


def test_too_long_prompt_and_full_queue_are_rejected(make_engine):
    engine = make_engine(num_kv_blocks=64, max_model_len=128, max_waiting_requests=2, max_num_seqs=1)
    with pytest.raises(PromptTooLongError) as err:
        engine.add_request("long", list(range(6, 106)), SamplingParams(max_tokens=40))
    assert "128" in str(err.value) and "140" in str(err.value) and "100 in the prompt" in str(err.value)
    assert isinstance(err.value, ValueError)
    engine.add_request("q1", [7, 8], SamplingParams())
    engine.add_request("q2", [7, 8], SamplingParams())
    engine.add_request("q3", [7, 8], SamplingParams())  # q1 takes the one batch slot: 2 really wait
    with pytest.raises(QueueFullError) as qf:
        engine.add_request("q4", [7, 8], SamplingParams())
    assert qf.value.retry_after > 0
    with pytest.raises(ValueError, match="already"):
        engine.add_request("q1", [7, 8], SamplingParams())
    with pytest.raises(ValueError, match="vocab|token ids"):
        engine.validate([10**6], SamplingParams())


def test_max_model_len_shrinks_to_a_small_kv_pool(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=16)
    assert engine.max_model_len == 64
    with pytest.raises(PromptTooLongError):
        engine.add_request("x", list(range(6, 66)), SamplingParams(max_tokens=5))
