"""The vocabulary-parallel embedding (Megatron-LM, Shoeybi et al. 2019; vLLM's ``VocabParallelEmbedding``).

Each rank holds ``vocab_per_rank`` consecutive rows of the table. A lookup zeroes the ids outside
the rank's rows, looks the others up, and an all-reduce sums the ranks' results: exactly one rank
contributes each token's row. The LM head shares the layout (tied or not); its logits are gathered
on rank 0 (:meth:`~kubeinfer_serving.distributed.group.TPGroup.gather_last_dim`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .group import TPGroup


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + rows)`` of a ``[V, hidden]`` embedding; the parameter is ``weight``
    ([rows, hidden], the Hugging Face name), so checkpoints load by name.

    Args:
        rows: rows this rank holds (``ceil(V / size)``); start: its first row; hidden: features.
        group: the tensor-parallel group (its all-reduce completes the lookup).
    """

    def __init__(self, rows: int, start: int, hidden: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.start = start
        self.rows = rows
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] int64 token ids -> [T, hidden] embeddings (identical on every rank)."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(out)
