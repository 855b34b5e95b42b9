"""One request's sequence: its tokens, how many have KV in the cache, and its block table."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .outputs import TokenLogprob
from .sampling import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life: queued, in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request being served (one sequence per request; n > 1 is not supported).

    Attributes:
        request_id: the caller's id.
        prompt_token_ids: the prompt, token ids.
        params: sampling parameters.
        arrival_time: ``time.monotonic()`` seconds when the request arrived.
        output_token_ids: tokens generated so far.
        num_computed_tokens: leading tokens of ``token_ids`` whose K/V are in the cache.
            After a preemption it drops to 0 and the tokens are recomputed.
        block_table: KV block ids, block i holds tokens [i*block_size, (i+1)*block_size).
        block_hashes: chained hashes of the full blocks registered in the prefix cache so far.
        num_cached_tokens: prompt tokens the prefix cache served at the first schedule.
        generator: per-request RNG when ``params.seed`` is set (on the engine's device).
        stop_token_ids: sampled ids that finish the sequence (its stop_token_ids, plus EOS
            unless ignore_eos).
        output_logprobs: one entry per output token when ``params.logprobs`` is set.
        prompt_logprobs: entries for the prompt positions scored so far (first one None)
            when ``params.prompt_logprobs`` is set; filled by the model runner chunk by chunk.
        min_tokens_stop_ids: tokens banned while fewer than ``params.min_tokens`` are out
            (EOS and ``stop_token_ids``; set by the engine).
        matcher: the grammar matcher when ``params.guide`` is set (advanced by the engine with
            each output token).
        lora: the LoRA adapter it runs with (:class:`~kubeinfer_serving.lora.adapter.LoRAAdapter`),
            None for the base model.
        status, finish_reason: lifecycle.
        first_scheduled_time / first_token_time / last_token_time: monotonic seconds, for metrics.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    generator: torch.Generator | None = None
    stop_token_ids: frozenset[int] = frozenset()
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    min_tokens_stop_ids: tuple[int, ...] = ()
    matcher: Any = None
    lora: Any = None

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the output so far (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        """Total tokens: prompt + output."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not yet in the cache (1 for a decoding sequence)."""
        return len(self) - self.num_computed_tokens

    def token_at(self, i: int) -> int:
        """Token id at position ``i`` of the whole sequence."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def is_finished(self) -> bool:
        """True once the sequence has left the engine."""
        return self.status is SequenceStatus.FINISHED
