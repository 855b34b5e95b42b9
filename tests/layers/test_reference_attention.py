"""The CPU reference attention (SDPA over gathered blocks, decode rows grouped by length) against
a plain per-sequence softmax attention written out by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from kubeinfer_serving.layers import attention as attn
from kubeinfer_serving.layers.attention import (
    group_by_length,
    reference_attention,
)

from tests.layers.attention_cases import pool_case


def test_decode_rows_of_very_different_lengths_are_split_into_groups_and_stay_exact(monkeypatch):
    # Small split cost: the 2..300-token contexts fall into several groups.
    monkeypatch.setattr(attn, "GROUP_SPLIT_ELEMENTS", 64)
    chunks = [(c - 1, 1) for c in (300, 2, 17, 299, 64, 65, 5, 128, 4, 250)]
    out, expected, meta = pool_case(reference_attention, chunks)
    groups = meta.reference_plan(2, 16).decode_groups
    assert len(groups) >= 3
    assert sum(g.size for g in groups) == len(chunks)
    assert sorted(meta.reference_plan(2, 16).decode_idx.tolist()) == list(range(len(chunks)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_mixed_step_prefill_chunks_with_and_without_context_and_grouped_decode_rows():
    chunks = [(0, 7), (40, 1), (9, 12), (3, 1), (0, 1), (100, 1), (33, 5)]
    out, expected, _ = pool_case(reference_attention, chunks, heads=6, kv_heads=2, head_dim=8, block_size=8, seed=3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_one_group_when_splitting_costs_more_than_the_padding(monkeypatch):
    monkeypatch.setattr(attn, "GROUP_SPLIT_ELEMENTS", 10 ** 12)
    out, expected, meta = pool_case(reference_attention, [(c - 1, 1) for c in (300, 2, 17, 64)])
    assert len(meta.reference_plan(2, 16).decode_groups) == 1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _cost(groups, blocks, split_cost):
    return sum(split_cost + len(g) * int(blocks[g].max()) for g in groups)


@pytest.mark.parametrize("seed", range(6))
def test_grouping_is_the_cheapest_partition_of_the_sorted_rows(seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(1, 30, size=int(rng.integers(1, 9)))
    split_cost = float(rng.choice([0.5, 3.0, 20.0]))
    groups = group_by_length(blocks, split_cost)
    assert sorted(np.concatenate(groups).tolist()) == list(range(blocks.size))
    assert [int(blocks[g].max()) for g in groups] == sorted((int(blocks[g].max()) for g in groups), reverse=True)
    # Brute force over every way to cut the distinct sorted counts into consecutive groups.
    vals = np.unique(blocks)
    best = None
    for cuts in itertools.product([False, True], repeat=max(0, vals.size - 1)):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [vals.size]
        cand = [np.flatnonzero((blocks >= vals[a]) & (blocks <= vals[b - 1]))
                for a, b in zip(bounds, bounds[1:], strict=False)]
        cost = _cost(cand, blocks, split_cost)
        best = cost if best is None else min(best, cost)
    assert _cost(groups, blocks, split_cost) == pytest.approx(best)


def test_grouping_extremes():
    same = np.array([5, 5, 5])
    assert [g.tolist() for g in group_by_length(same, 0.0)] == [[0, 1, 2]]
    varied = np.array([1, 9, 4, 9])
    assert len(group_by_length(varied, 0.0)) == 3  # one group per distinct length
    assert len(group_by_length(varied, 1e9)) == 1
    many = np.arange(1, 500)  # more distinct lengths than candidate cut points: still a partition
    groups = group_by_length(many, 1.0)
    assert sorted(np.concatenate(groups).tolist()) == list(range(many.size))
