"""Turns a scheduler plan into tensors, runs the model over the paged KV cache, samples.

Owns the KV pool: per layer a (K, V) pair of [num_blocks, block_size, num_kv_heads,
head_dim] tensors in the model's dtype, zero-initialised (padded attention reads of unused
slots then see finite values that the mask removes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kubeinfer_serving.layers.attention import AttentionMetadata

from .sampler import sample
from .scheduler import ScheduledSeq


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


@dataclass
class StepInputs:
    """A step's model inputs, built by :meth:`ModelRunner.prepare`.

    Attributes:
        input_ids: [T] int64 token ids of all scheduled tokens, flattened (device).
        positions: [T] int64 position of each token in its sequence (device).
        meta: attention metadata.
        logits_idx: [R] int64 batch index of the last token of each sequence that samples (device).
        sample_rows: the R indexes into the scheduled list of those sequences (host).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_idx: torch.Tensor
    sample_rows: list[int]


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
        self._stage: list[torch.Tensor | None] = [None, None]
        self._stage_i = 0
        #: host seconds the latest :meth:`prepare` took (for step statistics).
        self.last_prepare_s = 0.0

    def _staging(self, n: int) -> torch.Tensor:
        """A host int64 buffer of >= n elements to pack one step's inputs into.

        On CUDA two pinned buffers alternate (double buffering), so packing the next step
        never overwrites a buffer whose asynchronous host-to-device copy may be in flight.
        """
        self._stage_i ^= 1
        buf = self._stage[self._stage_i]
        if buf is None or buf.numel() < n:
            pin = self.device.type == "cuda"
            buf = torch.empty(max(n, 4096) * 2, dtype=torch.int64, pin_memory=pin)
            self._stage[self._stage_i] = buf
        return buf

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Build the step's inputs, vectorized over sequences (NumPy), with one host-to-device copy.

        Per sequence only Python list reads happen (its chunk's token ids and its block
        table); positions, slots, the padded block table, query offsets and logits indexes
        are NumPy array arithmetic over the whole batch. All integer inputs are packed into
        one int64 buffer and copied to the device at once (a no-op on CPU).

        Returns:
            :class:`StepInputs`.
        """
        bs = self.block_size
        num_seqs = len(scheduled)
        starts = np.fromiter([s.num_computed_before for s in scheduled], np.int64, num_seqs)
        q_lens = np.fromiter([s.num_new_tokens for s in scheduled], np.int64, num_seqs)
        totals = np.fromiter([len(s.seq) for s in scheduled], np.int64, num_seqs)
        tables = [s.seq.block_table for s in scheduled]
        ids = [
            s.seq.token_at(s.num_computed_before) if s.num_new_tokens == 1
            else s.seq.tokens_slice(s.num_computed_before, s.num_computed_before + s.num_new_tokens)
            for s in scheduled
        ]
        if int(q_lens.max()) > 1:
            ids = list(chain.from_iterable(i if isinstance(i, list) else (i,) for i in ids))
        num_tokens = int(q_lens.sum())
        nbs = np.fromiter(map(len, tables), np.int64, num_seqs)
        max_nb = int(nbs.max())
        seq_lens = starts + q_lens
        sample_rows = np.flatnonzero(seq_lens == totals)
        num_samples = sample_rows.size

        # One buffer: ids | positions | slots | logits_idx | query_start_loc | seq_lens | block tables.
        sizes = (num_tokens, num_tokens, num_tokens, num_samples, num_seqs + 1, num_seqs, num_seqs * max_nb)
        offs = np.cumsum((0,) + sizes)
        staging = self._staging(int(offs[-1]))
        host = staging.numpy()
        part = [host[offs[i]:offs[i + 1]] for i in range(len(sizes))]
        part[0][:] = ids
        qsl = part[4]
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1:])
        part[5][:] = seq_lens
        table = part[6].reshape(num_seqs, max_nb)
        table[:] = 0
        table[np.arange(max_nb)[None, :] < nbs[:, None]] = np.fromiter(chain.from_iterable(tables), np.int64,
                                                                          int(nbs.sum()))
        row_of = np.repeat(np.arange(num_seqs), q_lens)
        pos = part[1]
        np.subtract(np.arange(num_tokens), qsl[:-1][row_of] - starts[row_of], out=pos)
        np.add(table[row_of, pos // bs] * bs, pos % bs, out=part[2])
        np.subtract(qsl[1:][sample_rows], 1, out=part[3])

        dev = staging[:offs[-1]]
        if self.device.type != "cpu":
            dev = dev.to(self.device, non_blocking=True)  # pinned source: asynchronous
        d = [dev[offs[i]:offs[i + 1]] for i in range(len(sizes))]
        meta = AttentionMetadata(
            slot_mapping=d[2], query_start_loc=d[4], seq_lens=d[5], block_tables=d[6].view(num_seqs, max_nb),
            max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.copy(), seq_lens_cpu=seq_lens, block_tables_cpu=table.copy(), block_size=bs,
        )
        return StepInputs(d[0], d[1], meta, d[3], sample_rows.tolist())

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> list[int | None]:
        """Run one step and sample for every sequence whose chunk reaches its end.

        Returns:
            one entry per scheduled sequence: the sampled token id, or None for a prefill
            chunk that stops short of the sequence's end (nothing to sample yet).
        """
        t0 = time.perf_counter()
        inputs = self.prepare(scheduled)
        self.last_prepare_s = time.perf_counter() - t0
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        rows = inputs.sample_rows
        result: list[int | None] = [None] * len(scheduled)
        if not rows:
            return result
        logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_idx))
        seqs = [scheduled[i].seq for i in rows]
        # The step's one device-to-host copy: the sampled ids.
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        for i, tok in zip(rows, tokens, strict=True):
            result[i] = tok
        return result

    def release(self) -> None:
        """Drop the KV pool tensors (frees their memory once no other reference remains)."""
        self.kv_caches = []
