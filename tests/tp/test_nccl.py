"""Tensor parallelism over NCCL on two GPUs (skipped without two CUDA devices): the built-in tiny
Llama in float32 over 2 ranks against one rank on the same machine."""

from __future__ import annotations

import pytest
import torch
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine

from .conftest import run_workload

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def test_two_gpus_equal_one_gpu(tiny_dir):
    prompts = [list(range(5 + i, 40 + 3 * i)) for i in range(20)]
    config = dict(device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512)
    tp = LLMEngine.from_model_dir(tiny_dir, model_name="tiny-tp", config=EngineConfig(**config, tensor_parallel_size=2))
    try:
        assert tp.tp.group.data is not tp.tp.group.control  # activations over NCCL, plans over gloo
        tp_run = run_workload(tp, prompts, 16)
    finally:
        tp.release()
    one = LLMEngine.from_model_dir(tiny_dir, model_name="tiny", config=EngineConfig(**config, enforce_eager=True))
    one_run = run_workload(one, prompts, 16)
    assert tp_run.tokens == one_run.tokens
    for a, b in zip(tp_run.logits, one_run.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=0), float((a - b).abs().max())
