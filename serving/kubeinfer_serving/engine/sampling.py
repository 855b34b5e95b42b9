"""Per-request sampling parameters (OpenAI / vLLM meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Most top log-probabilities per token a request may ask for (vLLM's default cap).
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick each output token of one request, and when to stop.

    Attributes:
        max_tokens: most output tokens to generate (>= 1).
        temperature: softmax temperature (>= 0); 0 means greedy (argmax).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; <= 0 disables it.
        seed: seeds a per-request ``torch.Generator`` so sampled output is reproducible
            whatever else shares the batch; None draws from the engine's global generator.
        stop: strings that end the output; the returned text never contains them.
        stop_token_ids: token ids that end the output (finish reason "stop").
        ignore_eos: keep generating past the EOS token (benchmarks use this).
        priority: scheduling priority under the ``priority`` policy, as vLLM defines it: lower
            values are admitted first and preempted last; ties go by arrival. Must be 0 under ``fcfs``.
        cache_salt: prefix-cache salt (vLLM's ``cache_salt``): requests share cached KV blocks only
            with requests of the same salt; None shares with unsalted requests.
        presence_penalty: subtracted from the logit of every token already in the output
            (OpenAI/vLLM meaning), in [-2, 2]; 0 disables it.
        frequency_penalty: subtracted once per occurrence of a token in the output, in [-2, 2].
        repetition_penalty: CTRL's penalty (Keskar et al. 2019, as Hugging Face and vLLM apply it)
            on tokens of the prompt and the output: positive logits are divided by it, negative
            ones multiplied; > 0, 1 disables it.
        min_tokens: EOS and ``stop_token_ids`` cannot be sampled before this many output tokens.
        min_p: drop tokens whose probability (after temperature) is below ``min_p`` times the
            most likely token's; in [0, 1], 0 disables it.
        logit_bias: token id -> value added to its logit (OpenAI: -100 bans, 100 forces).
        allowed_token_ids: when set, only these tokens can be sampled.
        bad_words_token_ids: token-id sequences that never appear in the output: the last token
            of each is banned when the output ends with the others (vLLM's ``bad_words``).
        include_stop_str_in_output: keep the stop string that ended the output in its text.
        skip_special_tokens: leave special tokens (BOS, EOS, ...) out of the text (default).
        guide: a compiled grammar the output must match (structured outputs), or None. Any
            object whose ``matcher()`` returns a fresh matcher with ``compute_bitmask() -> bytes``
            (one bit per token id, little-endian int32 words, as llguidance and xgrammar give),
            ``consume_token(id) -> bool``, ``is_stopped() -> bool`` and ``is_error() -> bool`` /
            ``get_error() -> str`` (a failed matcher fails the request, never ends it as "stop"); see
            :class:`kubeinfer_serving.structured.CompiledGrammar`.
        logprobs: return the log-probability of each sampled token and of the ``logprobs`` most
            likely tokens at that step (0: the sampled token only); None returns none.
        prompt_logprobs: the same for every prompt token after the first (``echo`` with
            ``logprobs``); the prefix cache is bypassed for such a request.

    max_tokens may be 0 only with ``prompt_logprobs``: the request then scores its prompt and
    generates nothing (what lm-eval's loglikelihood requests send).

    Raises:
        ValueError: from ``__post_init__`` when a field is out of range, naming the field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    priority: int = 0
    cache_salt: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    guide: Any = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        lowest = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_tokens, int) or self.max_tokens < lowest:
            raise ValueError(f"max_tokens must be an integer >= {lowest}, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or not -(2**31) <= self.top_k < 2**31:
            raise ValueError(f"top_k must be an int32 (<= 0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if not isinstance(self.priority, int) or not -(2**31) <= self.priority < 2**31:
            raise ValueError(f"priority must be an int32, got {self.priority!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens >= 1 and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if any(k < 0 for k in self.logit_bias):
            raise ValueError("logit_bias keys must be non-negative token ids")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            if not self.allowed_token_ids or any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be a non-empty list of non-negative integers")
        self.bad_words_token_ids = [list(w) for w in (self.bad_words_token_ids or []) if w]
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")

    def max_token_id(self) -> int:
        """The largest token id any field refers to (-1 when none), for the engine's vocabulary check."""
        ids = list(self.logit_bias) + list(self.allowed_token_ids or []) + list(self.stop_token_ids)
        ids += [t for w in self.bad_words_token_ids for t in w]
        return max(ids, default=-1)

    @property
    def uses_penalties(self) -> bool:
        """True when presence, frequency or repetition penalties change the logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def uses_processors(self) -> bool:
        """True when any logits processor (grammar, penalties, bans, bias, min_tokens) applies to this request."""
        return (self.uses_penalties or self.min_tokens > 0 or bool(self.logit_bias) or self.guide is not None
                or self.allowed_token_ids is not None or bool(self.bad_words_token_ids))

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax (temperature 0)."""
        return self.temperature == 0.0
