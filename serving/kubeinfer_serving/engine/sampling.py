"""Per-request sampling parameters (OpenAI / vLLM meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
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

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax (temperature 0)."""
        return self.temperature == 0.0
