"""Building blocks of the attention tests: the metadata of a step from its chunks and block tables,
a pool filled for one step, and a hand-written attention to compare against."""

from __future__ import annotations

import numpy as np
import torch
from kubeinfer_serving.layers.attention import AttentionMetadata, write_kv


def step_metadata(chunks, tables, block_size, device) -> tuple[AttentionMetadata, int]:
    """Attention metadata of one step and its number of query tokens.

    ``chunks``: [(num_computed_before, num_new_tokens)] per sequence; ``tables``: each sequence's
    block table (block ids); the slot mapping covers the new tokens only.
    """
    q_lens = np.array([n for _, n in chunks], dtype=np.int64)
    seq_lens = np.array([s + n for s, n in chunks], dtype=np.int64)
    qsl = np.concatenate(([0], np.cumsum(q_lens)))
    width = max(len(t) for t in tables)
    bt = np.zeros((len(chunks), width), dtype=np.int64)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (s, n) in enumerate(chunks) for p in range(s, s + n)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.from_numpy(qsl).to(device), seq_lens=torch.from_numpy(seq_lens).to(device),
        block_tables=torch.from_numpy(bt).to(device), max_query_len=int(q_lens.max()),
        max_seq_len=int(seq_lens.max()), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, block_tables_cpu=bt,
        block_size=block_size,
    )
    return meta, int(q_lens.sum())


def naive_attention(q, k_seq, v_seq, first_pos, scale):
    """q [n, H, D] at positions first_pos.., k/v [ctx, KVH, D] -> [n, H, D], causal, GQA by repetition."""
    heads, kv_heads = q.shape[1], k_seq.shape[1]
    k = k_seq.repeat_interleave(heads // kv_heads, dim=1).double()
    v = v_seq.repeat_interleave(heads // kv_heads, dim=1).double()
    scores = torch.einsum("nhd,khd->hnk", q.double(), k) * scale
    pos = torch.arange(k.shape[0])
    allowed = pos[None, :] <= (first_pos + torch.arange(q.shape[0]))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnk,khd->nhd", scores.softmax(-1), v).float()


def pool_case(attend, chunks, *, heads=4, kv_heads=2, head_dim=16, block_size=4, seed=0, poison=None):
    """One step over a pool with ``poison`` outside the sequences' contexts (default: large finite
    values: +1e4 in K, -1e4 in V); returns ``attend``'s output, the naive output and the metadata.

    ``attend(q, k_step, v_step, k_cache, v_cache, meta, scale)`` is an attention function of
    :mod:`kubeinfer_serving.layers.attention` (the cache already holds the step's K/V).
    """
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(s + n) // block_size) for s, n in chunks]
    num_blocks = sum(need) + 5
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for nb in need:
        tables.append(perm[used:used + nb])
        used += nb
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, 1e4 if poison is None else poison)
    v_cache = torch.full(shape, -1e4 if poison is None else poison)
    slot = [tables[i][p // block_size] * block_size + p % block_size for i, (s, n) in enumerate(chunks)
            for p in range(s + n)]
    # Every sequence's context (earlier positions and this step's) gets real values.
    k_all = torch.randn((len(slot), kv_heads, head_dim), generator=gen)
    v_all = torch.randn((len(slot), kv_heads, head_dim), generator=gen)
    k_cache.view(-1, kv_heads, head_dim)[torch.tensor(slot)] = k_all
    v_cache.view(-1, kv_heads, head_dim)[torch.tensor(slot)] = v_all
    meta, num_tokens = step_metadata(chunks, tables, block_size, "cpu")
    qsl = meta.query_start_loc_cpu
    step_slots = meta.slot_mapping
    k_step = k_cache.view(-1, kv_heads, head_dim)[step_slots].clone()
    v_step = v_cache.view(-1, kv_heads, head_dim)[step_slots].clone()
    q = torch.randn((num_tokens, heads, head_dim), generator=gen)
    write_kv(k_step, v_step, k_cache, v_cache, meta.slot_mapping)
    scale = head_dim ** -0.5
    out = attend(q, k_step, v_step, k_cache, v_cache, meta, scale)
    expected = torch.empty_like(out)
    for i, (s, n) in enumerate(chunks):
        ctx_slots = torch.tensor([tables[i][p // block_size] * block_size + p % block_size for p in range(s + n)])
        a, b = int(qsl[i]), int(qsl[i + 1])
        expected[a:b] = naive_attention(q[a:b], k_cache.view(-1, kv_heads, head_dim)[ctx_slots],
                                        v_cache.view(-1, kv_heads, head_dim)[ctx_slots], s, scale)
    return out, expected, meta
