"""Decode CUDA graphs with LoRA adapters: the per-row adapter slots are graph inputs.

On CPU (always): the static-input layout carries each row's slot (padded rows -1), and the padded
static-input forward that gets captured decodes mixed base/adapter batches exactly as PEFT's
merged models do (the engine with graphs switched on, run eagerly, as
tests/engine/test_cuda_graphs.py does for the base model).
On CUDA (``cuda`` marker, skipped here without a GPU): graphs are captured once, replayed with
mixed adapters (including an adapter written into a slot after the capture), and equal the eager
engine token for token and the padded eager forward in hidden states.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubeinfer_serving.engine import cuda_graphs
from kubeinfer_serving.engine.cuda_graphs import layout, pack_decode_inputs
from kubeinfer_serving.engine.sampling import SamplingParams

from tests.lora.peft_adapters import SPECS, greedy
from tests.lora.test_engine_lora import _prompt, _run, _tokens

NAMES = [s.name for s in SPECS]


def _mixed_requests() -> list[tuple[str, list[int], str | None, int, int]]:
    """Base rows and every adapter, arriving over a few steps so decode steps mix them (with padding)."""
    adapters = [None, *NAMES]
    return [(f"r{i}", _prompt(30 + i, 3 + i % 5), adapters[i % len(adapters)], 6, i // 3) for i in range(7)]


def test_layout_with_lora_appends_the_row_slots_padded_with_minus_one():
    bucket, width, null, bs = 4, 3, 9, 16
    o = layout(bucket, width, lora=True)
    assert o[:7] == layout(bucket, width) and o[7] - o[6] == bucket
    out = np.full(o[-1] + 3, -7, dtype=np.int64)
    pack_decode_inputs(out, bucket, width, np.array([11, 12]), np.array([20, 3]), np.array([52, 3]),
                       np.array([21, 4]), np.array([[2, 3], [0, 0]]), null, bs, row_slots=np.array([1, -1]),
                       lora=True)
    assert out[o[6]:o[7]].tolist() == [1, -1, -1, -1]
    assert (out[o[7]:] == -7).all()
    pack_decode_inputs(out, bucket, width, np.array([11]), np.array([20]), np.array([52]), np.array([21]),
                       np.array([[2]]), null, bs, lora=True)
    assert out[o[6]:o[7]].tolist() == [-1] * 4  # no adapter rows: every row is the base model
    with pytest.raises(ValueError, match="without LoRA"):
        pack_decode_inputs(out, bucket, width, np.array([11]), np.array([20]), np.array([52]), np.array([21]),
                           np.array([[2]]), null, bs, row_slots=np.array([0]))


def test_padded_decode_with_mixed_adapters_equals_peft_on_cpu(triton_device, monkeypatch, lora_engine, peft_models):
    """The forward the graphs capture, with adapter slots as static inputs, run eagerly on CPU."""
    monkeypatch.setenv("KUBEINFER_ATTENTION_BACKEND", "triton")
    monkeypatch.setenv("KUBEINFER_FUSED_KERNELS", "1")
    monkeypatch.setattr(cuda_graphs, "graphs_enabled", lambda device, enforce_eager: not enforce_eager)
    engine = lora_engine(device=str(triton_device), max_num_seqs=8, enable_prefix_caching=False)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.lora
    padded = []
    real = graphs.run_padded

    def recording(bucket, ids, *rest):
        padded.append((bucket, len(ids), None if rest[-1] is None else rest[-1].tolist()))
        return real(bucket, ids, *rest)

    monkeypatch.setattr(graphs, "run_padded", recording)
    reqs = _mixed_requests()
    outs = _run(engine, reqs)
    for rid, prompt, name, n, _ in reqs:
        assert _tokens(outs[rid]) == greedy(peft_models(name), prompt, n), (rid, name)
    mixed = [p for p in padded if p[2] is not None and len({s for s in p[2] if s >= 0}) >= 2 and -1 in p[2]]
    assert mixed, f"no padded decode step mixed the base and two adapters: {padded}"
    assert any(bucket > rows for bucket, rows, _ in mixed), "padding rows alongside adapter rows"


@pytest.mark.cuda
def test_graph_replay_with_mixed_adapters_equals_eager(lora_engine, adapter_dirs):
    """Captured once with no adapter in any slot; replayed with mixed adapters; equal to the eager engine."""
    reqs = _mixed_requests() + [(f"x{i}", _prompt(60 + i, 4 + i), [None, *NAMES][i % 5], 10, 1 + i)
                                for i in range(8)]
    graphed = lora_engine(device="cuda", dtype="float32", max_num_seqs=16, max_loras=2)
    eager = lora_engine(device="cuda", dtype="float32", max_num_seqs=16, max_loras=2, enforce_eager=True)
    graphs = graphed.runner.graphs
    assert graphs is not None and graphs.lora and eager.runner.graphs is None
    captured = {bucket: id(graph) for bucket, (graph, _) in graphs._graphs.items()}
    a = _run(graphed, reqs)
    b = _run(eager, reqs)
    assert graphs.num_replays > 0
    assert {bucket: id(graph) for bucket, (graph, _) in graphs._graphs.items()} == captured, "captured once"
    assert graphed.lora.num_loads > 2, "more adapters than slots: adapters took slots after the capture"
    for rid, *_ in reqs:
        assert _tokens(a[rid]) == _tokens(b[rid]), rid


@pytest.mark.cuda
def test_graph_replay_hidden_states_with_adapter_slots_equal_the_padded_eager_forward(lora_engine):
    engine = lora_engine(device="cuda", dtype="float32", max_num_seqs=8, max_loras=4)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.lora
    for slot, name in enumerate(NAMES):  # every slot holds an adapter
        engine.runner.lora.slots.write(slot, engine.lora.adapters[name])
    for i in range(3):  # three sequences of 34 prompt tokens, each with its own blocks
        engine.add_request(f"p{i}", list(range(6 + i, 40 + i)),
                           SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill (eager): each sequence's KV cache now holds 34 positions
    table = np.array([s.block_table for s in engine.scheduler.running], dtype=np.int64)
    assert table.shape == (3, 3)
    args = (np.array([41, 42, 43]), np.array([34] * 3), table[:, 2] * 16 + 2, np.array([35] * 3), table)
    row_slots = np.array([2, -1, 0])
    eager = graphs.run_padded(4, *args, row_slots).clone()
    replayed = graphs.replay(4, *args, row_slots).clone()
    torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
    base = graphs.replay(4, *args, None).clone()
    assert not torch.allclose(replayed[0], base[0]) and torch.allclose(replayed[1], base[1], atol=1e-5)
