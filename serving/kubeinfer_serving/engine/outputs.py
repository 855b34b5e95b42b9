"""What the engine hands back per request per step."""

from __future__ import annotations

from dataclasses import dataclass


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
