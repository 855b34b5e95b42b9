"""Building blocks of the attention tests: the metadata of a step from its chunks and block tables."""

from __future__ import annotations

import numpy as np
import torch
from kubeinfer_serving.layers.attention import AttentionMetadata


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
