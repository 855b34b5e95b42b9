"""Turns a scheduler plan into tensors, runs the model over the paged KV cache, samples.

Owns the KV pool: per layer a (K, V) pair of [num_blocks, block_size, num_kv_heads,
head_dim] tensors in the model's dtype, zero-initialised (padded attention reads of unused
slots then see finite values that the mask removes).
"""

from __future__ import annotations

import torch

from .attention import AttentionMetadata, PrefillChunk
from .sampler import sample
from .scheduler import ScheduledSeq


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


class ModelRunner:
    """Runs :class:`~kubeinfer_serving.models.llama.LlamaForCausalLM` steps.

    Args:
        model: the loaded model (weights on ``device``).
        num_blocks: KV pool size in blocks.
        block_size: tokens per block.
        device: where the model and the pool live.
    """

    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.dtype, device=device), torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(model.num_layers)
        ]
        self.kv_cache_bytes = kv_bytes_per_block(
            model.num_layers, block_size, model.num_kv_heads, model.head_dim, model.dtype
        ) * num_blocks

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """[end - start] int64 cache slots of positions [start, end) of a sequence (on CPU)."""
        bs = self.block_size
        table = torch.tensor(block_table, dtype=torch.int64)
        pos = torch.arange(start, end, dtype=torch.int64)
        return table[pos // bs] * bs + pos % bs

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Build the step's inputs.

        Returns:
            input_ids [T] int64, positions [T] int64, attention metadata, and for each
            scheduled sequence the index of its last token in the batch (where logits are taken).
        """
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        last_idx: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_ctx: list[int] = []
        dev = self.device
        for s in scheduled:
            start, n = s.num_computed_before, s.num_new_tokens
            q_start = len(ids)
            ids.extend(s.seq.tokens_slice(start, start + n))
            positions.append(torch.arange(start, start + n, dtype=torch.int64))
            slots.append(self._slots(s.seq.block_table, start, start + n))
            last_idx.append(q_start + n - 1)
            if n == 1 and start > 0:
                decode_idx.append(q_start)
                decode_tables.append(s.seq.block_table)
                decode_ctx.append(start + 1)
            else:
                ctx = start + n
                mask = None
                kv_blocks = torch.empty(0, dtype=torch.int64)
                if start > 0:
                    nb = -(-ctx // self.block_size)
                    kv_blocks = torch.tensor(s.seq.block_table[:nb], dtype=torch.int64).to(dev, non_blocking=True)
                    rows = torch.arange(n).unsqueeze(1) + start
                    mask = (torch.arange(nb * self.block_size).unsqueeze(0) <= rows).to(dev, non_blocking=True)
                prefills.append(PrefillChunk(q_start, n, kv_blocks, mask))
        meta = AttentionMetadata(slot_mapping=torch.cat(slots).to(dev, non_blocking=True), prefills=prefills)
        if decode_idx:
            bs = self.block_size
            max_ctx = max(decode_ctx)
            max_blocks = -(-max_ctx // bs)
            table = torch.zeros((len(decode_tables), max_blocks), dtype=torch.int64)
            for i, bt in enumerate(decode_tables):
                nb = min(len(bt), max_blocks)
                table[i, :nb] = torch.tensor(bt[:nb], dtype=torch.int64)
            ctx = torch.tensor(decode_ctx, dtype=torch.int64)
            width = max_blocks * bs
            mask = (torch.arange(width).unsqueeze(0) < ctx.unsqueeze(1)).view(len(decode_ctx), 1, 1, width)
            meta.decode_idx = torch.tensor(decode_idx, dtype=torch.int64).to(dev, non_blocking=True)
            meta.decode_block_tables = table.to(dev, non_blocking=True)
            meta.decode_mask = mask.to(dev, non_blocking=True)
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.cat(positions).to(dev, non_blocking=True)
        return input_ids, pos, meta, last_idx

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> list[int | None]:
        """Run one step and sample for every sequence whose chunk reaches its end.

        Returns:
            one entry per scheduled sequence: the sampled token id, or None for a prefill
            chunk that stops short of the sequence's end (nothing to sample yet).
        """
        input_ids, positions, meta, last_idx = self.prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        rows = [i for i, s in enumerate(scheduled) if s.samples]
        result: list[int | None] = [None] * len(scheduled)
        if not rows:
            return result
        idx = torch.tensor([last_idx[i] for i in rows], dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[idx])
        seqs = [scheduled[i].seq for i in rows]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        for i, tok in zip(rows, tokens, strict=True):
            result[i] = tok
        return result

    def release(self) -> None:
        """Drop the KV pool tensors (frees their memory once no other reference remains)."""
        self.kv_caches = []
