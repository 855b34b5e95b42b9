"""The decode-roofline arithmetic, the written model shapes, random weights and the decode-step accounting."""

from __future__ import annotations

import math

import pytest
import torch
from kubeinfer_serving.bench import roofline
from kubeinfer_serving.bench.kubeinfer_bench import run_engine
from kubeinfer_serving.bench.roofline import (
    DecodeStep,
    decode_step_bytes,
    kv_bytes_per_token,
    summarize_decode,
)
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.models.llama import LlamaForCausalLM
from transformers import LlamaConfig


def _param_count(config) -> int:
    meta = LlamaForCausalLM(config, max_positions=1, dtype=torch.bfloat16, device=torch.device("meta"))
    return sum(p.numel() for p in meta.parameters())


def test_written_shapes_give_the_published_sizes():
    one_b = roofline.shapes_config("llama-3.2-1b")
    assert _param_count(one_b) == 1_235_814_400  # Llama-3.2-1B, tied embeddings counted once
    assert kv_bytes_per_token(one_b, torch.bfloat16) == 32 * 1024
    eight_b = roofline.shapes_config("llama-3.1-8b")
    assert _param_count(eight_b) == 8_030_261_248
    assert kv_bytes_per_token(eight_b, torch.bfloat16) == 128 * 1024
    with pytest.raises(KeyError):
        roofline.shapes_config("llama-9")


def test_roofline_of_a_1b_model_at_batch_256():
    # 2.47 GB of bf16 weights + 256 sequences x 1024 positions x 32 KiB at 3.0 TB/s: ~69.4k tokens/s.
    step = decode_step_bytes(2 * 1_235_814_400, 32 * 1024, 256 * 1024)
    assert step == 2_471_628_800 + 8_589_934_592
    s = summarize_decode([DecodeStep(0.01, 256, 256 * 1024)], 2 * 1_235_814_400, 32 * 1024, 3.0e12)
    assert s["roofline_tok_s"] == pytest.approx(69_440, rel=1e-3)
    assert s["decode_tok_s"] == pytest.approx(25_600)
    assert s["fraction"] == pytest.approx(25_600 / 69_440, rel=1e-3)


def test_summary_sums_bytes_and_time_over_steps():
    steps = [DecodeStep(0.01, 10, 1000), DecodeStep(0.02, 20, 3000)]
    s = summarize_decode(steps, 10**9, 1000, 1e12)
    assert s["tokens"] == 30 and s["steps"] == 2 and s["seconds"] == pytest.approx(0.03)
    assert s["bytes"] == 2 * 10**9 + 4 * 10**6
    assert s["ideal_seconds"] == pytest.approx(2.004e-3)
    assert s["roofline_tok_s"] == pytest.approx(30 / 2.004e-3)
    assert s["fraction"] == pytest.approx(2.004e-3 / 0.03)
    assert s["mean_batch"] == 15 and s["mean_context"] == pytest.approx(4000 / 30)
    assert "% of the roofline" in roofline.format_roofline(64, s)
    with pytest.raises(ValueError):
        summarize_decode([], 1, 1, 1e12)
    with pytest.raises(ValueError):
        summarize_decode(steps, 1, 1, 0)


def test_copy_bandwidth_is_measured():
    bw = roofline.measure_copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, iters=3)
    assert math.isfinite(bw) and bw > 1e6


def test_random_weights_build_an_engine_and_decode_steps_are_accounted():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    weights = list(roofline.random_weights(cfg, torch.float32, torch.device("cpu"), seed=3))
    again = dict(roofline.random_weights(cfg, torch.float32, torch.device("cpu"), seed=3))
    assert all(torch.equal(t, again[n]) for n, t in weights), "seeded"
    engine = LLMEngine.from_weights(cfg, weights, config=EngineConfig(device="cpu", num_kv_blocks=16,
                                                                      enable_prefix_caching=False))
    steps: list[DecodeStep] = []
    # one request: a prefill step, then 5 pure-decode steps reading 11, 12, ... 15 positions (the new one included)
    _, ttfts, out = run_engine(engine, [("a", list(range(1, 11)), 6)], steps)
    assert len(out["a"]) == 6 and len(ttfts) == 1
    assert [(s.rows, s.context_tokens) for s in steps] == [(1, c) for c in range(11, 16)]
    steps.clear()
    # two requests decoding together: one step of 2 rows per decode
    run_engine(engine, [("b", [5, 6, 7], 3), ("c", [8, 9], 3)], steps)
    assert [(s.rows, s.context_tokens) for s in steps] == [(2, 4 + 3), (2, 5 + 4)]
