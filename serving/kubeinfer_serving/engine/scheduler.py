"""Iteration-level scheduler: which sequences run in the next step, and how many tokens each.

Continuous batching as in Orca (Yu et al., OSDI 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models") with vLLM v1's unified token budget: every step first
gives each running sequence its uncomputed tokens (one for a decoding sequence, a chunk for a
partly prefilled one), then admits waiting sequences FIFO while the token budget
(``max_num_batched_tokens``) and the sequence cap (``max_num_seqs``) allow. A prompt longer
than the remaining budget is prefilled in chunks over several steps. When the KV pool runs
out, the newest running sequence is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed later (recompute preemption, vLLM's default).

After the model ran, :meth:`Scheduler.update_from_output` applies the step's result (as vLLM
v1's scheduler does): computed-token counts, prefix-cache registration of newly full blocks,
sampled tokens, and the token-level stop checks (stop token ids, max_tokens, max_model_len).

With the ``priority`` policy (vLLM's ``--scheduling-policy priority``) the waiting queue is kept
in (priority, arrival) order, lower values first, and the victim of a preemption is the running
sequence with the highest (priority, arrival): the least important, newest one.

With LoRA adapters a ``slot_gate`` (:class:`~kubeinfer_serving.lora.manager.LoRAManager`) must
pin a sequence's adapter in a device slot before it is admitted; a sequence whose adapter finds
no slot stays in the queue, in its place, and the next waiting one is considered (as vLLM does at
``max_loras``). The gate is released when a sequence leaves the running batch.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step.

    Attributes:
        seq: the sequence.
        num_new_tokens: tokens computed this step, starting at ``seq.num_computed_tokens``.
        num_computed_before: ``seq.num_computed_tokens`` when scheduled (the chunk's start).
    """

    seq: Sequence
    num_new_tokens: int
    num_computed_before: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so a token is sampled from it."""
        return self.num_computed_before + self.num_new_tokens == len(self.seq)


@dataclass
class SchedulerOutput:
    """The plan of one step.

    Attributes:
        scheduled: sequences to run, running ones first, in batch order.
        preempted: sequences preempted while planning (already back in the queue).
        newly_admitted: sequences moved from waiting to running this step.
        first_scheduled: those of them scheduled for the first time (not after a preemption).
        prefix_queries / prefix_hits: prompt tokens looked up / found in the prefix cache.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    newly_admitted: list[Sequence] = field(default_factory=list)
    first_scheduled: list[Sequence] = field(default_factory=list)
    prefix_queries: int = 0
    prefix_hits: int = 0

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed in this step."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to run."""
        return not self.scheduled


@dataclass
class SeqUpdate:
    """A sequence that got a token in a step (from :meth:`Scheduler.update_from_output`).

    Attributes:
        seq: the sequence (its ``output_token_ids`` already end with ``token``).
        token: the sampled token id.
        finish_reason: "stop" or "length" when the token finished it (it has left the
            scheduler and its blocks are free), else None.
    """

    seq: Sequence
    token: int
    finish_reason: str | None


class SlotGate(Protocol):
    """Admission condition beyond KV blocks: e.g. a LoRA adapter slot (see the module docstring)."""

    def acquire(self, seq: Sequence) -> bool:
        """Reserve what ``seq`` needs to run; False (nothing reserved) when it must wait."""

    def release(self, seq: Sequence) -> None:
        """Give back what :meth:`acquire` reserved for ``seq``."""


class Scheduler:
    """Holds the waiting queue and the running batch; plans steps.

    Args:
        block_manager: the KV pool.
        max_num_seqs: running-batch cap.
        max_num_batched_tokens: per-step token budget.
        max_model_len: a sequence reaching this many tokens finishes ("length"); None: no cap.
        policy: ``fcfs`` (arrival order, newest preempted first) or ``priority`` (see the module docstring).
        slot_gate: what a sequence must also acquire to be admitted (LoRA slots), or None.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None, policy: str = "fcfs", slot_gate: SlotGate | None = None) -> None:
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"unknown scheduling policy {policy!r}; use fcfs or priority")
        self.policy = policy
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.slot_gate = slot_gate

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the back."""
        seq.status = SequenceStatus.WAITING
        if self.policy == "priority":
            self._insert_by_priority(seq)
        else:
            self.waiting.append(seq)

    @staticmethod
    def _rank(seq: Sequence) -> tuple[int, float]:
        return (seq.params.priority, seq.arrival_time)

    def _insert_by_priority(self, seq: Sequence) -> None:
        keys = [self._rank(s) for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, self._rank(seq)), seq)

    def _pop_victim(self) -> Sequence:
        """The running sequence to preempt: the last one, i.e. the newest (fcfs) or, as ``schedule``
        sorts the batch by (priority, arrival) under the priority policy, the least important, newest."""
        return self.running.pop()

    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (see the module docstring); mutates queue, batch and block tables."""
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        if self.policy == "priority":
            self.running.sort(key=self._rank)  # important first: victims come from the tail

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            preempted_self = False
            while not bm.allocate_slots(seq, n):
                victim = self._pop_victim()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                break
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n
            i += 1

        if out.preempted:
            return out

        gate = self.slot_gate
        w = 0  # index into the queue: sequences before it wait for a slot of the gate
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[w]
            if gate is not None and not gate.acquire(seq):
                w += 1
                continue
            blocks, hashes = bm.match_prefix(seq)
            num_cached = len(blocks) * bm.block_size
            n = min(len(seq) - num_cached, budget)
            if not bm.allocate_slots(seq, n, blocks, hashes):
                if gate is not None:
                    gate.release(seq)
                break
            del self.waiting[w]
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = num_cached
                out.first_scheduled.append(seq)
            out.prefix_queries += len(seq)
            out.prefix_hits += num_cached
            self.running.append(seq)
            out.newly_admitted.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, num_cached))
            budget -= n
        return out

    def update_from_output(self, plan: SchedulerOutput, sampled: list[int | None]) -> list[SeqUpdate]:
        """Apply a step's result to the scheduled sequences.

        Args:
            plan: the step's plan from :meth:`schedule`.
            sampled: one entry per ``plan.scheduled`` item: the sampled token id, or None for
                a prefill chunk that stops short of the sequence's end.

        Returns:
            one :class:`SeqUpdate` per sequence that got a token, in batch order. Finished
            ones (stop token id, max_tokens, max_model_len) are already removed here.
        """
        bm = self.block_manager
        updates: list[SeqUpdate] = []
        for item, tok in zip(plan.scheduled, sampled, strict=True):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            bm.cache_full_blocks(seq)
            if tok is None:
                continue
            seq.output_token_ids.append(tok)
            reason = None
            if tok in seq.stop_token_ids:
                reason = "stop"
            elif seq.num_output_tokens >= seq.params.max_tokens or (
                self.max_model_len is not None and len(seq) >= self.max_model_len
            ):
                reason = "length"
            if reason is not None:
                self.finish(seq, reason)
            updates.append(SeqUpdate(seq, tok, reason))
        return updates

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove ``seq`` from the engine (running or waiting) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            if self.slot_gate is not None:
                self.slot_gate.release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if self.slot_gate is not None:
            self.slot_gate.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.policy == "priority":
            self._insert_by_priority(seq)
        else:
            self.waiting.appendleft(seq)
