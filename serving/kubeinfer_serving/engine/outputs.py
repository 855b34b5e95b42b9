"""What the engine hands back per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The log-probability of one token at one position, with the most likely alternatives.

    Values are natural logs of the distribution the model gives after the request's logits
    processors (penalties, ``logit_bias``, bans, ``min_tokens``) and before temperature,
    top-k, top-p and min-p; for prompt tokens, of the raw model distribution. Computed in
    float32 on the logits' device.

    Attributes:
        token_id: the token at this position (sampled, or the prompt's).
        logprob: its log-probability (float; ``-inf`` when it was banned).
        top: the ``k`` most likely (token id, log-probability) pairs at this position, most
            likely first (empty when only the token's own value was asked for).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class RequestTimings:
    """When a request passed its phases, in ``time.monotonic()`` seconds (None: not reached).

    Attributes:
        arrival: the request was added to the engine.
        first_scheduled: it left the waiting queue (prefill started).
        first_token: its first output token was sampled (prefill done).
        last_token: its latest output token was sampled.
    """

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    last_token: float | None


@dataclass
class RequestOutput:
    """The progress of one request since its previous output (a streaming delta).

    Attributes:
        request_id: the caller's id.
        new_token_ids: token ids generated since the previous output of this request.
        new_text: detokenized text of those tokens; stop strings are trimmed, and text that
            could still turn into a stop string is held back until it cannot.
        finished: True on the request's last output.
        finish_reason: "stop" (EOS, stop string or stop token), "length" (max_tokens or the
            context length) or "abort"; None while running.
        num_prompt_tokens: prompt length in tokens.
        num_output_tokens: output tokens generated so far (in total, not the delta).
        num_cached_tokens: prompt tokens served from the prefix cache at the first schedule.
        error: set (with finish_reason "error") when the engine failed this one request while
            preparing, running or sampling it; the engine itself keeps serving the others.
        new_logprobs: one entry per token of ``new_token_ids`` when the request asked for
            ``logprobs``, else None.
        prompt_logprobs: on the request's first output, when it asked for ``prompt_logprobs``:
            one entry per prompt token, None for the first (nothing predicts it); else None.
        timings: phase times of the request, set on the last output only (None before).
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str | None = None
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    timings: RequestTimings | None = None
