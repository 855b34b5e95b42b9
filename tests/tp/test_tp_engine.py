"""Tensor parallelism on CPU (gloo, 2 ranks) against one rank, on the built-in tiny Llama.

The same workload runs through a 2-rank engine and a 1-rank engine with the same small KV pool and
token budget: chunked prefills beside decodes, preemptions and prefix-cache hits all happen, and
the greedy outputs must agree token for token, every sampled logits row within 1e-4, and the
log-probabilities of the requests that ask for them (prompt positions included: those steps make
more than one logits call, each a collective) within 1e-4.
"""

from __future__ import annotations

import random

import pytest
import torch
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine

from .conftest import run_workload

NUM_PROMPTS = 24
MAX_TOKENS = 12


def _config(tp: int) -> EngineConfig:
    # 24 blocks of 16 tokens cannot hold 24 sequences of up to 60 tokens: preemption; a 64-token
    # step budget splits long prompts into chunks that share steps with decodes.
    return EngineConfig(device="cpu", num_kv_blocks=24, max_num_batched_tokens=64, max_num_seqs=16,
                        tensor_parallel_size=tp)


def _prompts() -> list[list[int]]:
    rng = random.Random(23)
    shared = [rng.randrange(8192) for _ in range(32)]  # two full blocks: prefix-cache hits
    prompts = []
    for i in range(NUM_PROMPTS):
        tail = [rng.randrange(8192) for _ in range(rng.randrange(4, 40))]
        prompts.append(shared + tail if i % 3 == 0 else tail)
    return prompts


@pytest.fixture(scope="module")
def runs(tiny_dir):
    """(2-rank run, 1-rank run) of the same workload."""
    tp = LLMEngine.from_model_dir(tiny_dir, model_name="tiny-tp", config=_config(2))
    try:
        assert tp.tp is not None and len(tp.tp.pids) == 1
        tp_run = run_workload(tp, _prompts(), MAX_TOKENS, scored_every=4)
    finally:
        tp.release()
    one = LLMEngine.from_model_dir(tiny_dir, model_name="tiny", config=_config(1))
    return tp_run, run_workload(one, _prompts(), MAX_TOKENS, scored_every=4)


def test_greedy_output_equals_one_rank_token_for_token(runs):
    tp_run, one_run = runs
    assert len(one_run.tokens) == NUM_PROMPTS
    assert all(len(t) == MAX_TOKENS for t in one_run.tokens.values())
    assert tp_run.tokens == one_run.tokens


def test_logits_within_1e4_of_one_rank(runs):
    tp_run, one_run = runs
    assert len(tp_run.logits) == len(one_run.logits) > 0
    for a, b in zip(tp_run.logits, one_run.logits, strict=True):
        assert a.shape == b.shape and a.shape[1] == 8192
        assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())


def test_mixed_steps_preemption_and_prefix_hits_happen_under_tp(runs):
    tp_run, one_run = runs
    mixed = [s for s in tp_run.steps if any(n > 1 for _, n in s) and any(n == 1 and c > 0 for c, n in s)]
    assert mixed, "no step had a prefill chunk beside a decode"
    assert tp_run.preemptions > 0
    assert tp_run.prefix_hits > 0
    assert tp_run.steps == one_run.steps  # the scheduler above the model is unchanged


def test_logprobs_and_prompt_logprobs_equal_one_rank(runs):
    tp_run, one_run = runs
    assert len(one_run.logprobs) == NUM_PROMPTS // 4
    assert tp_run.logprobs.keys() == one_run.logprobs.keys()
    for rid, entries in one_run.logprobs.items():
        assert len(tp_run.logprobs[rid]) == len(entries) > MAX_TOKENS  # prompt positions and outputs
        for a, b in zip(tp_run.logprobs[rid], entries, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a.top, b.top, strict=True))
