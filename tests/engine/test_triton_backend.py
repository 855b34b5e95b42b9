"""The engine on its CUDA code path -- the Triton paged-attention kernel and the fused norm/activation
kernels (on CPU: under Triton's interpreter) -- agrees with Hugging Face greedy decoding token for
token, over mixed prefill/decode steps and prefix-cache hits."""

from __future__ import annotations

import pytest
from kubeinfer_serving.engine.sampling import SamplingParams

from .conftest import tokens_of


@pytest.fixture
def triton_backend(triton_device, monkeypatch):
    monkeypatch.setenv("KUBEINFER_ATTENTION_BACKEND", "triton")
    monkeypatch.setenv("KUBEINFER_FUSED_KERNELS", "1")
    return triton_device


def test_engine_on_the_triton_kernels_matches_hf_greedy(triton_backend, make_engine, hf_greedy):
    engine = make_engine(device=str(triton_backend), num_kv_blocks=32, max_num_batched_tokens=40)
    shared = [(7 * i) % 8000 + 6 for i in range(33)]  # two full blocks + 1: later requests hit the prefix cache
    prompts = {"a": shared, "b": shared[:32] + [77, 78, 79], "c": [5, 900, 17, 4000, 23]}
    n = 4
    outs: dict[str, list] = {rid: [] for rid in prompts}
    engine.add_request("a", prompts["a"], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    for o in engine.step():  # "a" prefills its first 40-token budget alone
        outs[o.request_id].append(o)
    for rid in ("b", "c"):
        engine.add_request(rid, prompts[rid], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id].append(o)
    for rid, prompt in prompts.items():
        assert tokens_of(outs[rid]) == hf_greedy(prompt, n), rid
    assert outs["b"][-1].num_cached_tokens == 32
