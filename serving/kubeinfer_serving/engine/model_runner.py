"""Turns a scheduler plan into tensors, runs the model over the paged KV cache, samples.

Owns the KV pool: per layer a (K, V) pair of [num_blocks, block_size, num_kv_heads,
head_dim] tensors in the model's dtype, zero-initialised (padded attention reads of unused
slots then see finite values that the mask removes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kubeinfer_serving.layers.attention import AttentionMetadata, attention_backend
from kubeinfer_serving.lora.manager import LoRAManager
from kubeinfer_serving.lora.slots import LoRAStep

from .cuda_graphs import DecodeGraphs
from .logits_processors import apply_logits_processors
from .outputs import TokenLogprob
from .sampler import _h2d, sample
from .scheduler import ScheduledSeq
from .sequence import Sequence
from .staging import DeviceToHost, HostToDevice

log = logging.getLogger(__name__)

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


def _copy_to_host(tensors: list[torch.Tensor], staging: DeviceToHost) -> list[list]:
    """Bring several device tensors to the host in one copy (one synchronisation).

    Every tensor is cast to float64 (exact for token ids below 2**53) and flattened into one
    buffer, fetched through ``staging`` (float64); the result gives each back as nested lists
    of its original shape.
    """
    if not tensors:
        return []
    flat = staging.fetch(torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]))
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


@dataclass
class StepInputs:
    """A step's model inputs, built by :meth:`ModelRunner.prepare`.

    Attributes:
        input_ids: [T] int64 token ids of all scheduled tokens, flattened (device).
        positions: [T] int64 position of each token in its sequence (device).
        meta: attention metadata.
        logits_idx: [R] int64 batch index of the last token of each sequence that samples (device).
        sample_rows: the R indexes into the scheduled list of those sequences (host).
        host: host (NumPy) views of the packed input ids, positions and slot mapping, [T] int64
            each (valid until the next-but-one :meth:`ModelRunner.prepare`).
        lora: each row's LoRA adapter slot (its ``kept`` for the ``logits_idx`` rows) when some
            scheduled sequence has an adapter, else None; not built for a graph replay
            (``to_device=False``), which takes ``row_slots`` instead.
        row_slots: [T] int64 host LoRA slot of each row (-1: none) when some scheduled sequence
            has an adapter, else None.
        packed: the whole packed int64 host buffer the inputs were built from (what tensor-parallel
            workers receive), and counts: its (num_tokens, num_samples, num_seqs, max_nb).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_idx: torch.Tensor
    sample_rows: list[int]
    host: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    lora: LoRAStep | None = None
    row_slots: np.ndarray | None = None
    packed: np.ndarray | None = None
    counts: tuple[int, int, int, int] = (0, 0, 0, 0)


def buffer_sizes(num_tokens: int, num_samples: int, num_seqs: int, max_nb: int) -> tuple[int, ...]:
    """Lengths of the parts of a step's packed int64 input buffer: ids | positions | slots |
    logits_idx | query_start_loc | seq_lens | block tables (see :meth:`ModelRunner.prepare`)."""
    return (num_tokens, num_tokens, num_tokens, num_samples, num_seqs + 1, num_seqs, num_seqs * max_nb)


def step_inputs_from_buffer(host: np.ndarray, dev: torch.Tensor, num_tokens: int, num_samples: int,
                            num_seqs: int, max_nb: int, block_size: int) -> StepInputs:
    """The :class:`StepInputs` of a packed step buffer (as :meth:`ModelRunner.prepare` packs it).

    Args:
        host: the packed int64 buffer on the host (NumPy); dev: the same values where the model
            runs (the host buffer itself on CPU).
        num_tokens, num_samples, num_seqs, max_nb: the part sizes (see :func:`buffer_sizes`).
        block_size: tokens per KV block.

    Returns:
        the inputs, ``sample_rows`` empty and ``lora`` None (the caller fills them when it knows them).
    """
    offs = np.cumsum((0,) + buffer_sizes(num_tokens, num_samples, num_seqs, max_nb))
    part = [host[offs[i]:offs[i + 1]] for i in range(7)]
    d = [dev[offs[i]:offs[i + 1]] for i in range(7)]
    qsl, seq_lens = part[4], part[5]
    meta = AttentionMetadata(
        slot_mapping=d[2], query_start_loc=d[4], seq_lens=d[5], block_tables=d[6].view(num_seqs, max_nb),
        max_query_len=int((qsl[1:] - qsl[:-1]).max()), max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=qsl.copy(), seq_lens_cpu=seq_lens, block_tables_cpu=part[6].reshape(num_seqs, max_nb).copy(),
        block_size=block_size,
    )
    return StepInputs(d[0], d[1], meta, d[3], [], host=(part[0], part[1], part[2]), packed=host,
                      counts=(num_tokens, num_samples, num_seqs, max_nb))


def _logits_idx_slice(inputs: StepInputs) -> slice:
    """Where the logits indexes lie in ``inputs.packed`` (see :func:`buffer_sizes`)."""
    num_tokens, num_samples = inputs.counts[0], inputs.counts[1]
    return slice(3 * num_tokens, 3 * num_tokens + num_samples)


class ModelRunner:
    """Runs :class:`~kubeinfer_serving.models.llama.LlamaForCausalLM` steps.

    Args:
        model: the loaded model (weights on ``device``).
        num_blocks: KV pool size in blocks.
        block_size: tokens per block.
        device: where the model and the pool live.
        cuda_graph_sizes: batch-size buckets to capture decode CUDA graphs for (see
            :mod:`kubeinfer_serving.engine.cuda_graphs`), or None for eager steps only. With
            graphs the pool gets one more block, the null block of padded rows.
        max_model_len: context length in tokens; sets the graphs' block-table width (needed
            with ``cuda_graph_sizes``).
        lora: the engine's LoRA adapters and slots, or None (LoRA off). With decode graphs, the
            graphs apply each row's adapter (slot indexes as graph inputs), so decode steps that
            mix adapters replay too.
        tp: with a tensor-parallel model, rank 0's
            :class:`~kubeinfer_serving.distributed.executor.TPExecutor`: each step's plan goes to
            the workers before the forward; with ``cuda_graph_sizes`` the graphs are captured by
            :meth:`capture_graphs` once the workers capture theirs (every rank's warm-up steps
            and graphs hold the same collectives), and a pure-decode step tells the workers which
            bucket to replay (:meth:`~kubeinfer_serving.distributed.executor.TPExecutor.send_replay`).
            None: one rank.
    """

    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, *,
                 cuda_graph_sizes: list[int] | None = None, max_model_len: int | None = None,
                 lora: LoRAManager | None = None, tp=None) -> None:
        self.model = model
        self.lora = lora
        self.tp = tp
        self.block_size = block_size
        self.device = device
        pool_blocks = num_blocks + (1 if cuda_graph_sizes else 0)
        shape = (pool_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.dtype, device=device), torch.zeros(shape, dtype=model.dtype, device=device))
            for _ in range(model.num_layers)
        ]
        self.kv_cache_bytes = kv_bytes_per_block(
            model.num_layers, block_size, model.num_kv_heads, model.head_dim, model.dtype
        ) * pool_blocks
        #: decode graphs (None: every step runs eagerly).
        self.graphs: DecodeGraphs | None = None
        if cuda_graph_sizes:
            if max_model_len is None:
                raise ValueError("cuda_graph_sizes needs max_model_len")
            self.graphs = DecodeGraphs(model, self.kv_caches, cuda_graph_sizes, -(-max_model_len // block_size),
                                       block_size, device, lora_slots=lora.slots if lora is not None else None)
            if tp is None:
                self.capture_graphs()
        if attention_backend(device, model.dtype) == "cpu":
            from kubeinfer_serving.layers.paged_attention_cpu import warm_up

            warm_up()  # compile (or load) the decode kernel now, not in the first request's step
        # A step's inputs go up through pinned double-buffered staging, each buffer's reuse
        # guarded by an event recorded after its upload.
        self._inputs_to_device = HostToDevice(device)
        # Results come back through pinned double-buffered staging: sampled ids (int64) and,
        # when log-probabilities are asked for, everything packed as float64.
        self._ids_to_host = DeviceToHost(device, torch.int64)
        self._values_to_host = DeviceToHost(device, torch.float64)
        #: host seconds the latest :meth:`prepare` took (for step statistics).
        self.last_prepare_s = 0.0

    def capture_graphs(self) -> None:
        """Capture the decode graphs (on CUDA; elsewhere nothing is captured and pure-decode steps
        run the padded static inputs eagerly). A failed capture leaves every step eager (warned).
        Called by the constructor with one rank; with tensor parallelism by
        :meth:`~kubeinfer_serving.distributed.executor.TPExecutor.start` after the workers were told."""
        if self.graphs is None or self.device.type != "cuda":
            return
        try:
            self.graphs.capture()
        except Exception:  # noqa: BLE001 - graphs are an optimisation: serve eagerly rather than fail the load
            log.warning("decode CUDA graph capture failed; every step runs eagerly", exc_info=True)
            self.graphs = None

    def prepare(self, scheduled: list[ScheduledSeq], to_device: bool = True) -> StepInputs:
        """Build the step's inputs, vectorized over sequences (NumPy), with one host-to-device copy.

        Per sequence only Python list reads happen (its chunk's token ids and its block
        table); positions, slots, the padded block table, query offsets and logits indexes
        are NumPy array arithmetic over the whole batch. All integer inputs are packed into
        one int64 buffer and copied to the device at once (a no-op on CPU) through
        :class:`~.staging.HostToDevice` (pinned, double-buffered; packing waits until the
        buffer's previous upload has been read); ``to_device=False`` skips that copy (a graph
        replay uploads its own padded inputs; the tensors then stay on the host).

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
        sizes = buffer_sizes(num_tokens, num_samples, num_seqs, max_nb)
        offs = np.cumsum((0,) + sizes)
        staging = self._inputs_to_device.host_buffer(int(offs[-1]))
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
        if to_device:
            dev = self._inputs_to_device.upload(dev)  # pinned source: asynchronous, fenced (CPU: the view)
        inputs = step_inputs_from_buffer(host[:offs[-1]], dev, num_tokens, num_samples, num_seqs, max_nb, bs)
        lora_step = row_slots = None
        if self.lora is not None and any(s.seq.lora is not None for s in scheduled):
            seq_slots = np.fromiter([self.lora.slot_of(s.seq.lora) for s in scheduled], np.int64, num_seqs)
            row_slots = seq_slots[row_of]
            if to_device:
                lora_step = LoRAStep(self.lora.slots, row_slots, self.device)
                lora_step.kept = LoRAStep(self.lora.slots, seq_slots[sample_rows], self.device)
        inputs.sample_rows = sample_rows.tolist()
        inputs.lora = lora_step
        inputs.row_slots = row_slots
        return inputs

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
        t0 = time.perf_counter()
        bucket = self._decode_bucket(scheduled)
        inputs = self.prepare(scheduled, to_device=bucket is None)
        self.last_prepare_s = time.perf_counter() - t0
        rows = inputs.sample_rows
        result: list[int | None] = [None] * len(scheduled)
        prompt_jobs: list[tuple[Sequence, list[int], list[int]]] = []
        if any(s.seq.params.prompt_logprobs is not None for s in scheduled):
            last_idx = (inputs.meta.query_start_loc_cpu[1:] - 1).tolist()
            prompt_jobs = _prompt_logprob_jobs(scheduled, last_idx)
        computed = None
        if bucket is None:
            # Only the sampling rows' final hidden states are needed unless prompt positions are
            # scored: then the last layer skips the rest of a prefill chunk after writing its K/V.
            keep = None
            if not prompt_jobs and len(rows) < inputs.input_ids.shape[0]:
                keep = inputs.logits_idx
            if self.tp is not None:
                hidden, computed = self._run_tp(inputs, keep, prompt_jobs)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, keep,
                                    inputs.lora)
            logits_idx = None if keep is not None else inputs.logits_idx
        else:
            # One token per row: batch row i is scheduled item i; rows that do not sample are
            # one-token prefill chunks short of their prompt's end.
            # (Off CUDA, where nothing is captured, the same padded static inputs run eagerly: tests.)
            run = self.graphs.replay if self.device.type == "cuda" else self.graphs.run_padded
            args = (*inputs.host, inputs.meta.seq_lens_cpu, inputs.meta.block_tables_cpu)
            if self.tp is not None:  # every rank replays its graph of this bucket, then the same logits call
                calls = [np.asarray(rows, np.int64)] if rows else []
                try:
                    self.tp.send_replay(bucket, *args, calls)
                    hidden = run(bucket, *args)
                    computed = iter([self.model.compute_logits(hidden.index_select(0, _h2d(c.tolist(), torch.int64,
                                                                                            self.device)))
                                     for c in calls])
                except Exception as exc:
                    raise self.tp.failure(exc) from exc
            else:
                hidden = run(bucket, *args, inputs.row_slots)
            logits_idx = None if len(inputs.sample_rows) == len(scheduled) else _h2d(
                inputs.sample_rows, torch.int64, self.device)
        if not rows and not prompt_jobs:
            return result
        to_host: list[torch.Tensor] = []
        seqs = [scheduled[i].seq for i in rows]
        lp_rows: list[int] = []
        if rows:
            last = hidden if logits_idx is None else hidden.index_select(0, logits_idx)
            raw = next(computed) if computed is not None else self.model.compute_logits(last)
            logits = apply_logits_processors(raw, seqs)
            tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
            if not prompt_jobs and all(s.params.logprobs is None for s in seqs):
                # The step's one device-to-host copy: the sampled ids.
                for i, tok in zip(rows, self._ids_to_host.fetch(tokens), strict=True):
                    result[i] = tok
                return result
            to_host.append(tokens)
            lp_rows = [j for j, s in enumerate(seqs) if s.params.logprobs is not None and s.params.max_tokens > 0]
            k = max((seqs[j].params.logprobs for j in lp_rows), default=0)
            if lp_rows:
                sel = _h2d(lp_rows, torch.int64, self.device)
                to_host.extend(_token_logprobs(logits[sel], tokens[sel], k))
        prompt_parts = self._prompt_logprobs(hidden, prompt_jobs, computed)
        host = _copy_to_host(to_host + prompt_parts, self._values_to_host)  # the step's one device-to-host copy
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

    def _decode_bucket(self, scheduled: list[ScheduledSeq]) -> int | None:
        """The graph bucket this step replays: pure decode (one token per row) that fits a bucket, and
        no row with an adapter unless the graphs apply adapters; else None."""
        if self.graphs is None:
            return None
        if any(s.num_new_tokens != 1 for s in scheduled):
            return None
        if not self.graphs.lora and any(s.seq.lora is not None for s in scheduled):
            return None
        if self.tp is not None and any(s.seq.params.prompt_logprobs is not None for s in scheduled):
            return None  # a replayed step carries one logits call (the sampling rows'), no prompt scoring
        return self.graphs.bucket_for(len(scheduled))

    def _run_tp(self, inputs: StepInputs, keep: torch.Tensor | None,
                prompt_jobs: list[tuple[Sequence, list[int], list[int]]]):
        """Rank 0 of a tensor-parallel step: send the plan, run the forward and every logits call
        the step makes (the workers make the same collective calls in the same order).

        Returns:
            (hidden states, an iterator over the logits in call order: the sampling rows' first
            when any sequence samples, then each prompt-logprobs slice of ``_PROMPT_ROWS`` rows).

        Raises:
            kubeinfer_serving.distributed.executor.WorkerFailedError: a collective failed (a worker
                died or timed out); the model cannot run any more.
        """
        calls: list[np.ndarray] = []
        if inputs.sample_rows:
            num = len(inputs.sample_rows)
            calls.append(np.arange(num) if keep is not None else inputs.packed[_logits_idx_slice(inputs)])
        for _, batch_rows, _ in prompt_jobs:
            calls.extend(np.asarray(batch_rows[a:a + _PROMPT_ROWS], np.int64)
                         for a in range(0, len(batch_rows), _PROMPT_ROWS))
        try:
            self.tp.send_step(inputs, keep is not None, calls)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, keep, inputs.lora)
            computed = [self.model.compute_logits(hidden.index_select(0, _h2d(c.tolist(), torch.int64, self.device)))
                        for c in calls]
        except Exception as exc:
            raise self.tp.failure(exc) from exc
        return hidden, iter(computed)

    def _prompt_logprobs(self, hidden: torch.Tensor, jobs: list[tuple[Sequence, list[int], list[int]]],
                         computed=None) -> list[torch.Tensor]:
        """Device tensors (own, top values, top ids) per job, rows in slices of ``_PROMPT_ROWS``
        (``computed``: the slices' logits already computed, in order, by a tensor-parallel step)."""
        parts: list[torch.Tensor] = []
        for seq, batch_rows, targets in jobs:
            k = seq.params.prompt_logprobs or 0
            own_l, v_l, i_l = [], [], []
            for a in range(0, len(batch_rows), _PROMPT_ROWS):
                tgt = _h2d(targets[a:a + _PROMPT_ROWS], torch.int64, self.device)
                if computed is not None:
                    logits = next(computed)
                else:
                    logits = self.model.compute_logits(hidden[_h2d(batch_rows[a:a + _PROMPT_ROWS], torch.int64,
                                                                   self.device)])
                own, v, i = _token_logprobs(logits, tgt, k)
                own_l.append(own)
                v_l.append(v)
                i_l.append(i)
            parts.extend([torch.cat(own_l), torch.cat(v_l), torch.cat(i_l)])
        return parts

    def release(self) -> None:
        """Drop the KV pool tensors and any decode graphs (frees their memory once no other reference
        remains); with tensor parallelism, stop the workers too."""
        self.kv_caches = []
        self.graphs = None
        if self.tp is not None:
            self.tp.close()
