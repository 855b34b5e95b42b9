"""Turns a scheduler plan into tensors, runs the model over the paged KV cache, samples.

Owns the KV pool: per layer a (K, V) pair of [num_blocks, block_size, num_kv_heads,
head_dim] tensors in the model's dtype, zero-initialised (padded attention reads of unused
slots then see finite values that the mask removes).
"""

from __future__ import annotations

import torch

from .attention import AttentionMetadata, PrefillChunk
from .logits_processors import apply_logits_processors
from .outputs import TokenLogprob
from .sampler import sample
from .scheduler import ScheduledSeq
from .sequence import Sequence

#: Prompt positions whose logits are materialised at once when scoring a prompt ([rows, vocab] fp32).
_PROMPT_ROWS = 512


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def _token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of given tokens and the top ``k`` per row.

    Args:
        logits: [N, V] float32.
        token_ids: [N] int64, the token whose log-probability each row reports.
        k: how many of the most likely tokens to return (0: none).

    Returns:
        ([N] float32 own log-probabilities, [N, k] float32 top values, [N, k] int64 top ids),
        computed in float32 on the logits' device with ``log_softmax``.
    """
    logprobs = logits.float().log_softmax(dim=-1)
    own = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    if k > 0:
        top_v, top_i = logprobs.topk(k, dim=-1)
    else:
        top_v = logprobs.new_empty((logits.shape[0], 0))
        top_i = torch.empty((logits.shape[0], 0), dtype=torch.int64, device=logits.device)
    return own, top_v, top_i


def _prompt_logprob_jobs(scheduled: list[ScheduledSeq], last_idx: list[int]
                         ) -> list[tuple[Sequence, list[int], list[int]]]:
    """For each sequence scoring its prompt: (seq, batch rows, target token ids) of this chunk.

    Row ``r`` holds the hidden state of position ``p``; its target is prompt token ``p + 1``.
    Positions already scored (before a preemption, say) are skipped. The first prompt token
    gets a None entry when scoring starts.
    """
    jobs = []
    for s, last in zip(scheduled, last_idx, strict=True):
        seq = s.seq
        if seq.params.prompt_logprobs is None:
            continue
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        n_prompt = seq.num_prompt_tokens
        start = s.num_computed_before
        first = max(start, len(seq.prompt_logprobs) - 1)
        end = min(start + s.num_new_tokens, n_prompt - 1)
        if first >= end:
            continue
        q_start = last - s.num_new_tokens + 1
        jobs.append((seq, [q_start + p - start for p in range(first, end)], seq.prompt_token_ids[first + 1:end + 1]))
    return jobs


def _copy_to_host(tensors: list[torch.Tensor]) -> list[list]:
    """Bring several device tensors to the host in one copy (one synchronisation).

    Every tensor is cast to float64 (exact for token ids below 2**53) and flattened into one
    buffer; the result gives each back as nested lists of its original shape.
    """
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    out: list[list] = []
    pos = 0
    for t in tensors:
        n = t.numel()
        chunk = flat[pos:pos + n]
        pos += n
        if t.dim() == 2:
            width = t.shape[1]
            chunk = [chunk[r * width:(r + 1) * width] for r in range(t.shape[0])]
        out.append(chunk)
    return out


def _triples(host: list[list]):
    """Group a flat list of host values into (own, top values, top ids) triples."""
    for i in range(0, len(host), 3):
        yield host[i], host[i + 1], host[i + 2]


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

        Each sampled row first goes through its request's logits processors
        (:func:`~kubeinfer_serving.engine.logits_processors.apply_logits_processors`). For a
        sequence that asked for ``logprobs`` the sampled token's :class:`TokenLogprob` is
        appended to ``seq.output_logprobs`` (not when ``max_tokens`` is 0: nothing is output);
        for one that asked for ``prompt_logprobs`` the prompt positions of this chunk are
        appended to ``seq.prompt_logprobs``. Everything the host needs comes back in one
        device-to-host copy.

        Returns:
            one entry per scheduled sequence: the sampled token id, or None for a prefill
            chunk that stops short of the sequence's end (nothing to sample yet).
        """
        input_ids, positions, meta, last_idx = self.prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        rows = [i for i, s in enumerate(scheduled) if s.samples]
        result: list[int | None] = [None] * len(scheduled)
        prompt_jobs = _prompt_logprob_jobs(scheduled, last_idx)
        if not rows and not prompt_jobs:
            return result
        to_host: list[torch.Tensor] = []
        tokens = None
        seqs = [scheduled[i].seq for i in rows]
        if rows:
            idx = torch.tensor([last_idx[i] for i in rows], dtype=torch.int64, device=self.device)
            logits = apply_logits_processors(self.model.compute_logits(hidden[idx]), seqs)
            tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
            if not prompt_jobs and all(s.params.logprobs is None for s in seqs):
                for i, tok in zip(rows, tokens.tolist(), strict=True):
                    result[i] = tok
                return result
            to_host.append(tokens)
            lp_rows = [j for j, s in enumerate(seqs) if s.params.logprobs is not None and s.params.max_tokens > 0]
            k = max((seqs[j].params.logprobs for j in lp_rows), default=0)
            if lp_rows:
                sel = torch.tensor(lp_rows, dtype=torch.int64, device=self.device)
                to_host.extend(_token_logprobs(logits[sel], tokens[sel], k))
        prompt_parts = self._prompt_logprobs(hidden, prompt_jobs)
        host = _copy_to_host(to_host + prompt_parts)
        if rows:
            toks = [int(t) for t in host.pop(0)]
            for i, tok in zip(rows, toks, strict=True):
                result[i] = tok
            if lp_rows:
                own, top_v, top_i = host.pop(0), host.pop(0), host.pop(0)
                for n, j in enumerate(lp_rows):
                    kj = seqs[j].params.logprobs
                    seqs[j].output_logprobs.append(
                        TokenLogprob(toks[j], own[n], list(zip((int(t) for t in top_i[n][:kj]), top_v[n][:kj],
                                                               strict=True))))
        for job, (own, top_v, top_i) in zip(prompt_jobs, _triples(host), strict=True):
            seq, targets = job[0], job[2]
            k = seq.params.prompt_logprobs
            for n, tok in enumerate(targets):
                seq.prompt_logprobs.append(
                    TokenLogprob(tok, own[n], list(zip((int(t) for t in top_i[n][:k]), top_v[n][:k], strict=True))))
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, jobs: list[tuple[Sequence, list[int], list[int]]]
                         ) -> list[torch.Tensor]:
        """Device tensors (own, top values, top ids) per job, rows in slices of ``_PROMPT_ROWS``."""
        parts: list[torch.Tensor] = []
        for seq, batch_rows, targets in jobs:
            k = seq.params.prompt_logprobs or 0
            own_l, v_l, i_l = [], [], []
            for a in range(0, len(batch_rows), _PROMPT_ROWS):
                sel = torch.tensor(batch_rows[a:a + _PROMPT_ROWS], dtype=torch.int64, device=self.device)
                tgt = torch.tensor(targets[a:a + _PROMPT_ROWS], dtype=torch.int64, device=self.device)
                own, v, i = _token_logprobs(self.model.compute_logits(hidden[sel]), tgt, k)
                own_l.append(own)
                v_l.append(v)
                i_l.append(i)
            parts.extend([torch.cat(own_l), torch.cat(v_l), torch.cat(i_l)])
        return parts

    def release(self) -> None:
        """Drop the KV pool tensors (frees their memory once no other reference remains)."""
        self.kv_caches = []
