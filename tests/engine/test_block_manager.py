"""Block manager: allocation, freeing, prefix-cache hits and LRU reuse of cached blocks."""

from __future__ import annotations

from kubeinfer_serving.engine.block_manager import BlockManager
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.engine.sequence import Sequence


def _seq(tokens, rid="s"):
    return Sequence(rid, list(tokens), SamplingParams())


def _compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and 'compute' the whole sequence as one prefill, registering full blocks."""
    blocks, hashes = bm.match_prefix(seq)
    n = len(seq) - len(blocks) * bm.block_size
    assert bm.allocate_slots(seq, n, blocks, hashes)
    seq.num_computed_tokens = len(seq)
    bm.cache_full_blocks(seq)


def test_allocate_grows_block_table_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = _seq(range(10))
    assert bm.allocate_slots(s, 10)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5 and abs(bm.usage - 3 / 8) < 1e-9
    s.num_computed_tokens = 10
    assert bm.allocate_slots(s, 2)  # positions 10, 11 fit in block 3
    assert len(s.block_table) == 3
    assert bm.allocate_slots(s, 3)  # positions 10..12 need a 4th block
    assert len(s.block_table) == 4
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = _seq(range(8), "a"), _seq(range(100, 108), "b")
    assert bm.allocate_slots(a, 8)
    assert not bm.allocate_slots(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_prefix_hit_reuses_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _seq(range(12), "a")
    _compute_all(bm, a)
    # Same 12 tokens: only 2 of the 3 full blocks match, so the last token is computed again.
    b = _seq(range(12), "b")
    blocks, _ = bm.match_prefix(b)
    assert blocks == a.block_table[:2]
    # A longer prompt sharing 9 tokens matches the two full blocks of the shared 8.
    c = _seq(list(range(9)) + [99, 98, 97], "c")
    blocks, _ = bm.match_prefix(c)
    assert blocks == a.block_table[:2]
    # A different first token shares nothing (hashes are chained).
    d = _seq([77] + list(range(1, 12)), "d")
    assert bm.match_prefix(d) == ([], [])


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _seq(range(9), "a")
    _compute_all(bm, a)
    b = _seq(list(range(8)) + [50, 51], "b")
    _compute_all(bm, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.num_free_blocks == 10 - 3 - 1
    bm.free(a)
    assert all(bm.ref_counts[x] == 1 for x in b.block_table[:2])
    assert bm.num_free_blocks == 10 - 3
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_freed_cached_blocks_are_reused_then_evicted_least_recent_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    old = _seq(range(9), "old")  # 2 full cached blocks + 1 partial
    _compute_all(bm, old)
    bm.free(old)
    new = _seq(range(200, 209), "new")
    _compute_all(bm, new)
    bm.free(new)
    # A request with old's prefix still finds it: freed cached blocks stay until evicted.
    assert len(bm.match_prefix(_seq(range(9), "x"))[0]) == 2
    assert len(bm.match_prefix(_seq(range(200, 209), "y"))[0]) == 2
    # Pressure: 3 new blocks take the free unhashed blocks first (new's partial block and the
    # never-used one), then the least recently freed cached block: old's last full block, so
    # old keeps its first block and new keeps both.
    filler = _seq(range(500, 512), "filler")
    assert bm.allocate_slots(filler, 12)
    assert len(bm.match_prefix(_seq(range(9), "x"))[0]) == 1
    assert len(bm.match_prefix(_seq(range(200, 209), "y"))[0]) == 2


def test_prefix_caching_disabled_never_matches():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _seq(range(12), "a")
    _compute_all(bm, a)
    bm.free(a)
    assert bm.match_prefix(_seq(range(12), "b")) == ([], [])
