"""SmolLM2-135M-Instruct (9 heads, 3 KV heads, real weights) split over 3 ranks on CPU (gloo) against one rank."""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.models.builtin import BUILTIN_CHAT_MODEL_NAME, model_cache_root

from .conftest import run_workload

pytestmark = pytest.mark.realmodel

SENTENCES = [
    "The capital of France is", "Water boils at", "The largest planet in the solar system is",
    "To make a cup of tea, first", "Python is a programming language that", "The opposite of hot is",
    "In 1492, Columbus", "A triangle has", "The sun rises in the", "Photosynthesis is the process by which",
    "The chemical symbol for gold is", "My favourite fruit is", "The speed of light is about",
    "Kubernetes schedules", "A haiku is a poem with", "The Pacific Ocean is", "Two plus two equals",
    "The first person to walk on the moon was", "Bread is made from", "A week has",
]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def smollm2_dir():
    from kubeinfer_serving.models.builtin import builtin_model_dir

    if not any(model_cache_root().glob("smollm2-135m-instruct-*/model.safetensors")):
        pytest.skip("SmolLM2 is not in the model cache (~/.cache/kubeinfer/models)")
    return builtin_model_dir(BUILTIN_CHAT_MODEL_NAME)


def test_three_ranks_equal_one_rank_token_for_token_and_logits(smollm2_dir):
    config = dict(device="cpu", num_kv_blocks=64, max_num_batched_tokens=128, max_model_len=256)
    tp = LLMEngine.from_model_dir(smollm2_dir, model_name="smollm2-tp3", config=EngineConfig(**config,
                                                                                         tensor_parallel_size=3))
    try:
        assert len(tp.tp.pids) == 2 and tp.model.num_kv_heads == 1
        prompts = [tp.tokenizer.encode(s) for s in SENTENCES]
        tp_run = run_workload(tp, prompts, MAX_TOKENS)
    finally:
        tp.release()
    one = LLMEngine.from_model_dir(smollm2_dir, model_name="smollm2", config=EngineConfig(**config))
    one_run = run_workload(one, prompts, MAX_TOKENS)
    assert len(one_run.tokens) == len(SENTENCES)
    assert tp_run.tokens == one_run.tokens
    for a, b in zip(tp_run.logits, one_run.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())
