"""The batched device sampler against a row-by-row reference, and its distribution.

The sampler runs wholly on the logits' device (no host round trip); these tests run it on CUDA
when present, else on CPU (the same code). The reference below is written independently: one
row at a time, filtering with NumPy, drawing the same exponential noise from the row's seeded
generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kubeinfer_serving.engine.sampler import sample
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.engine.staging import DeviceToHost

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference_row(logits: np.ndarray, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One row: greedy argmax, else temperature -> min-p -> top-k -> top-p -> p / Exp(1) noise argmax."""
    if p.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / p.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep = np.ones_like(probs, dtype=bool)
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    order = np.argsort(-np.where(keep, x, -np.inf), kind="stable")
    if p.top_k > 0:
        keep[order[p.top_k:]] = False
    if p.top_p < 1.0:
        kept = probs * keep
        kept /= kept.sum()
        mass_before = np.cumsum(kept[order]) - kept[order]
        drop = order[(mass_before >= p.top_p)]
        drop = drop[drop != order[0]]
        keep[drop] = False
    final = np.where(keep, probs, 0.0)
    final /= final.sum()
    noise = torch.empty(len(logits), device=gen.device).exponential_(generator=gen).cpu().double().numpy()
    return int(np.argmax(final / noise))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def test_greedy_rows_are_the_argmax():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    params = [SamplingParams(temperature=0.0)] * 64
    assert torch.equal(sample(logits, params, [None] * 64), logits.argmax(-1))


def test_seeded_rows_equal_the_row_by_row_reference():
    vocab = 200
    logits = (3 * torch.randn(6, vocab, generator=torch.Generator().manual_seed(1))).to(DEVICE)
    params = [
        SamplingParams(temperature=0.0, seed=1),
        SamplingParams(temperature=0.8, seed=11),
        SamplingParams(temperature=1.3, top_k=5, seed=12),
        SamplingParams(temperature=1.0, top_p=0.6, seed=13),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=14),
        SamplingParams(temperature=1.0, min_p=0.05, seed=15),
    ]
    for trial in range(5):  # several draws: the generators advance identically on both sides
        got = sample(logits, params, [_gen(p.seed + 100 * trial) for p in params]).tolist()
        host = logits.float().cpu().numpy()
        want = [_reference_row(host[i], p, _gen(p.seed + 100 * trial)) for i, p in enumerate(params)]
        assert got == want


def test_top_k_without_top_p_equals_the_reference_with_disabled_and_greedy_rows():
    # No row asks for top_p: the partial-selection path (apply_top_k), not the sort.
    vocab = 500
    logits = (2 * torch.randn(5, vocab, generator=torch.Generator().manual_seed(2))).to(DEVICE)
    params = [
        SamplingParams(temperature=1.0, top_k=1, seed=21),
        SamplingParams(temperature=1.2, top_k=7, seed=22),
        SamplingParams(temperature=0.9, seed=23),  # top_k disabled beside rows that use it
        SamplingParams(temperature=0.0, seed=24),
        SamplingParams(temperature=1.0, top_k=vocab + 5, seed=25),  # k beyond the vocabulary: disabled
    ]
    for trial in range(8):
        got = sample(logits, params, [_gen(p.seed + 100 * trial) for p in params]).tolist()
        host = logits.float().cpu().numpy()
        want = [_reference_row(host[i], p, _gen(p.seed + 100 * trial)) for i, p in enumerate(params)]
        assert got == want
    assert got[0] == int(logits[0].argmax())


@pytest.mark.parametrize(("kwargs", "allowed"), [
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.75}, {0, 1, 2}),  # 0.4 + 0.25 < 0.75 <= 0.4 + 0.25 + 0.15
    ({"top_k": 4, "top_p": 0.5}, {0, 1}),
])
def test_filtered_tokens_are_never_sampled_and_kept_ones_follow_their_probabilities(kwargs, allowed):
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 20000
    logits = probs.log().expand(n, -1).contiguous().to(DEVICE)
    torch.manual_seed(0)
    if DEVICE.type == "cuda":
        torch.cuda.manual_seed(0)
    params = [SamplingParams(temperature=1.0, **kwargs)] * n
    counts = torch.bincount(sample(logits, params, [None] * n).cpu(), minlength=6).double()
    assert set(torch.nonzero(counts).flatten().tolist()) == allowed
    keep = torch.tensor([i in allowed for i in range(6)])
    expected = torch.where(keep, probs, 0.0).double()
    expected /= expected.sum()
    # binomial standard error at n=20000 is below 0.0036: 5 sigma
    assert torch.allclose(counts / n, expected, atol=0.018)


def test_temperature_flattens_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    n = 20000
    logits = probs.log().expand(n, -1).contiguous().to(DEVICE)
    torch.manual_seed(1)
    counts = torch.bincount(sample(logits, [SamplingParams(temperature=2.0)] * n, [None] * n).cpu(), minlength=3)
    expected = probs.sqrt() / probs.sqrt().sum()  # p^(1/T), renormalised
    assert torch.allclose(counts.double() / n, expected.double(), atol=0.018)


def test_device_to_host_staging_returns_the_values_and_alternates_buffers():
    staging = DeviceToHost(DEVICE, torch.int64, initial=4)
    a = torch.arange(10, device=DEVICE)
    b = torch.arange(100, 103, device=DEVICE)
    assert staging.fetch(a) == list(range(10))
    assert staging.fetch(b) == [100, 101, 102]
    assert staging.fetch(a.view(2, 5)) == list(range(10))
    values = DeviceToHost(DEVICE, torch.float64)
    assert values.fetch(torch.tensor([0.5, -2.0], device=DEVICE)) == [0.5, -2.0]


@pytest.mark.cuda
def test_staging_buffers_are_pinned_and_distinct_on_cuda():
    staging = DeviceToHost(torch.device("cuda"), torch.int64, initial=4)
    staging.fetch(torch.arange(3, device="cuda"))
    staging.fetch(torch.arange(3, device="cuda"))
    a, b = staging._bufs
    assert a.is_pinned() and b.is_pinned() and a.data_ptr() != b.data_ptr()
