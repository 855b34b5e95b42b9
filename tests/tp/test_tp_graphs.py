"""Decode CUDA graphs per rank under tensor parallelism (issue 23 build item 2).

Rank 0 tells the workers the graph buckets at ``OP_INIT`` (every rank captures the same ones, in
the same order, with NCCL all-reduces inside) and, for each pure-decode step, which bucket to
replay with which padded inputs (``OP_REPLAY``).

* CPU (gloo): nothing can be captured (gloo collectives are not capturable; graphs stay off on
  CPU by default), but with buckets forced on, every rank runs the *same padded static inputs*
  eagerly (what the graphs capture), so the replay protocol, the padding and the null block are
  checked against one eager rank, token for token and logits within 1e-4.
* CUDA (2 GPUs, skipped otherwise): replayed graphs under TP=2 against eager steps under TP=2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubeinfer_serving.distributed.protocol import OP_REPLAY, decode_replay, encode_replay, replay_payload_len
from kubeinfer_serving.engine import llm_engine
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine

from .conftest import run_workload

BUCKETS = [1, 2, 4, 8]


def _prompts() -> list[list[int]]:
    return [list(range(7 + 3 * i, 20 + 5 * i)) for i in range(20)]


def test_replay_message_round_trips():
    ids, pos, slots, lens = (np.arange(3, dtype=np.int64) + k for k in (10, 20, 30, 40))
    tables = np.arange(6, dtype=np.int64).reshape(3, 2)
    calls = [np.array([0, 2], np.int64)]
    h, payload = encode_replay(4, ids, pos, slots, lens, tables, calls)
    assert int(h[0]) == OP_REPLAY and replay_payload_len(h) == payload.numel()
    bucket, arrays, got_calls = decode_replay(h, payload.numpy())
    assert bucket == 4
    for a, b in zip(arrays, (ids, pos, slots, lens, tables), strict=True):
        assert np.array_equal(a, b)
    assert [c.tolist() for c in got_calls] == [[0, 2]]


def test_padded_replay_steps_on_two_cpu_ranks_equal_one_eager_rank(tiny_dir, monkeypatch):
    config = dict(device="cpu", num_kv_blocks=64, max_num_seqs=8, max_model_len=256)
    one = LLMEngine.from_model_dir(tiny_dir, model_name="tiny", config=EngineConfig(**config))
    assert one.runner.graphs is None
    one_run = run_workload(one, _prompts(), 12)

    monkeypatch.setattr(llm_engine, "decode_graph_sizes", lambda *a, **k: list(BUCKETS))
    tp = LLMEngine.from_model_dir(tiny_dir, model_name="tiny-tp",
                                  config=EngineConfig(**config, tensor_parallel_size=2))
    try:
        graphs = tp.runner.graphs
        assert graphs is not None and tp.tp.graphs_ok
        padded = []
        real = graphs.run_padded

        def counting(bucket, *args):
            padded.append(bucket)
            return real(bucket, *args)

        monkeypatch.setattr(graphs, "run_padded", counting)
        tp_run = run_workload(tp, _prompts(), 12)
    finally:
        tp.release()
    assert padded and set(padded) <= set(BUCKETS)  # pure-decode steps went through the replay protocol
    assert tp_run.tokens == one_run.tokens
    for a, b in zip(tp_run.logits, one_run.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graph_replay_on_two_gpus_equals_eager_steps(tiny_dir):
    config = dict(device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512, max_num_seqs=16,
                  tensor_parallel_size=2)
    graphs_engine = LLMEngine.from_model_dir(tiny_dir, model_name="tiny-tp-graphs", config=EngineConfig(**config))
    try:
        assert graphs_engine.runner.graphs is not None and graphs_engine.tp.graphs_ok
        assert graphs_engine.cuda_graph_bytes > 0
        graph_run = run_workload(graphs_engine, _prompts(), 16)
        assert graphs_engine.runner.graphs.num_replays > 0
    finally:
        graphs_engine.release()
    eager = LLMEngine.from_model_dir(tiny_dir, model_name="tiny-tp-eager",
                                     config=EngineConfig(**config, enforce_eager=True))
    try:
        assert eager.runner.graphs is None
        eager_run = run_workload(eager, _prompts(), 16)
    finally:
        eager.release()
    assert graph_run.tokens == eager_run.tokens
    for a, b in zip(graph_run.logits, eager_run.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=0), float((a - b).abs().max())
