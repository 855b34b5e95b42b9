"""``POST /v1/completions`` (OpenAI's legacy text completions), streaming and not.

Several prompts and ``n > 1`` are served as separate engine requests; choice ``index`` is
``prompt_index * n + j``, as OpenAI numbers them. ``echo`` prepends the prompt text; with
``logprobs`` it also prepends the prompt tokens' log-probabilities (the first token's is
null), and ``max_tokens: 0`` then scores the prompt without generating (lm-eval's
loglikelihood requests).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.fields import check_fields
from kubeinfer_serving.api.generation import (
    GenerationRun,
    Job,
    bad_words_token_ids,
    check_fanout,
    sampling_params,
)
from kubeinfer_serving.api.limits import OffLoopJSONRoute
from kubeinfer_serving.api.logprobs import TokenText, completion_logprobs, merge, prompt_completion_logprobs
from kubeinfer_serving.api.prompts import completion_prompts
from kubeinfer_serving.api.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from kubeinfer_serving.api.serving import (
    SYSTEM_FINGERPRINT,
    ChoiceResult,
    GenerationServing,
    UsageCounter,
    acquire,
    cache_salt,
    check_stream_fields,
    http_response,
    resolve_model_name,
    resolve_priority,
)
from kubeinfer_serving.api.sse import sse_event
from kubeinfer_serving.api.structured import compile_guide, forbids_additional_properties, grammar_spec
from kubeinfer_serving.engine.sampling import MAX_LOGPROBS
from kubeinfer_serving.engine.validation import output_budget
from kubeinfer_serving.registry.protocol import ModelKind, ServedModel

router = APIRouter(route_class=OffLoopJSONRoute)


class CompletionServing(GenerationServing):
    """One ``/v1/completions`` request: checked, prepared (prompts tokenized, one job per prompt and
    choice), then answered by :meth:`full_response` (a ``text_completion``) or :meth:`stream_events`.

    Args:
        request: the HTTP request.
        body: the parsed request body.
    """

    cache_route: str | None = "completions"
    id_prefix = "cmpl"
    #: What :meth:`prepare` finds: each prompt's text to echo, and token texts for log-probabilities.
    echo_texts: list[str] = []
    text_of: TokenText | None = None

    def check(self) -> None:
        """Refuse what this route cannot honour, naming the field (400), and enforce the fan-out cap.

        Raises:
            APIError: unimplemented fields that would change the output (others are ignored and
                reported, :mod:`.fields`); ``best_of`` other than ``n``; ``suffix``;
                ``logprobs`` outside [0, 20]; ``max_tokens: 0`` without ``echo``; ``stream_options``
                without ``stream``; more prompts x ``n`` than ``--max-jobs-per-request``.
        """
        body = self.body
        check_fields(self.request, body, defaults={"add_special_tokens": True})
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported by this server", param="best_of",
                           code="unsupported_parameter")
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_parameter")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs", code="invalid_value")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is only allowed with echo (to score the prompt)", param="max_tokens",
                           code="invalid_value")
        check_stream_fields(body)
        num_prompts = len(body.prompt) if isinstance(body.prompt, list) and body.prompt and not isinstance(
            body.prompt[0], int) else 1
        check_fanout(self.request, num_prompts, body.n)

    async def prepare(self, stack: AsyncExitStack) -> tuple[ServedModel, list[Job]]:
        """The model (acquired on ``stack``), priority and cache salt, the grammar, the prompts' token
        ids, each prompt's output budget and the jobs (choice ``index`` = ``prompt_index * n + j``).

        Raises:
            APIError: 400 for bad prompts or constraints (naming the field), 404/503 from the provider.
        """
        request, body = self.request, self.body
        structured = grammar_spec(body, forbids_additional_properties(request, body))
        model = resolve_model_name(request, body.model, ModelKind.GENERATE)
        served = await acquire(request, stack, model, ModelKind.GENERATE)
        priority = resolve_priority(request, body, served)
        salt = cache_salt(request, body)
        guide = (await compile_guide(request, served.engine, served.tokenizer, structured[1], structured[0])
                 if structured else None)
        prompts = await asyncio.to_thread(completion_prompts, served.tokenizer, body.prompt, served.engine.validator)
        bad = await asyncio.to_thread(bad_words_token_ids, served.tokenizer, body.bad_words) if body.bad_words else None
        if isinstance(body.prompt, str):
            self.echo_texts = [body.prompt]
        elif isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            self.echo_texts = list(body.prompt)
        else:
            self.echo_texts = [served.tokenizer.decode(ids) for ids in prompts]
        want_lp = body.logprobs
        jobs: list[Job] = []
        for p, ids in enumerate(prompts):
            max_tokens = output_budget(served.max_model_len, body.max_tokens, len(ids), param="prompt")
            for j in range(body.n):
                index = p * body.n + j
                params = sampling_params(body, max_tokens, j, priority, salt, bad_words_ids=bad,
                                         guide=guide, logprobs=want_lp,
                                         prompt_logprobs=want_lp if body.echo and want_lp is not None else None)
                jobs.append(Job(index, p, f"{self.response_id}-{index}", ids, params))
        self.model = model
        self.text_of = TokenText(served.tokenizer, bool(body.return_tokens_as_token_ids))
        return served, jobs

    def _echo(self, job: Job) -> str:
        """The prompt text to prepend to ``job``'s output (``echo``), else ''."""
        return self.echo_texts[job.prompt_index] if self.body.echo else ""

    def full_response(self, results: list[ChoiceResult], usage: Usage) -> CompletionResponse:
        """The ``text_completion`` object: per choice its text (after the echoed prompt), log-probabilities
        and finish reason."""
        body, want_lp = self.body, self.body.logprobs
        choices = []
        for job in self._jobs:
            r = results[job.index]
            logprobs = None
            if want_lp is not None:
                head, offset = CompletionLogprobs(), 0
                if body.echo and r.prompt_logprobs is not None:
                    head, _ = prompt_completion_logprobs(job.prompt_token_ids, r.prompt_logprobs, self.text_of,
                                                         want_lp)
                    offset = len(self._echo(job))
                tail, _ = completion_logprobs(r.logprobs, self.text_of, want_lp, offset)
                logprobs = merge(head, tail)
            choices.append(CompletionChoice(index=job.index, text=self._echo(job) + r.text, logprobs=logprobs,
                                            finish_reason=r.finish_reason))
        return CompletionResponse(id=self.response_id, created=self.created, model=self.model, choices=choices,
                                  usage=usage, system_fingerprint=SYSTEM_FINGERPRINT)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None) -> str:
        return sse_event(CompletionResponse(id=self.response_id, created=self.created, model=self.model,
                                            choices=choices, usage=usage, system_fingerprint=SYSTEM_FINGERPRINT))

    async def stream_events(self, run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
        """``text_completion`` events: each choice's echoed prompt first, then its text as it comes;
        the usage event when asked."""
        body, want_lp = self.body, self.body.logprobs
        include_usage, continuous = self.stream_options()
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        async for job, out in run.outputs():
            usage.update(job, out)
            text = out.new_text
            logprobs = None
            head = CompletionLogprobs()
            if job.index not in echoed:
                echoed.add(job.index)
                text = self._echo(job) + text
                if want_lp is not None and body.echo and out.prompt_logprobs is not None:
                    head, _ = prompt_completion_logprobs(job.prompt_token_ids, out.prompt_logprobs, self.text_of,
                                                         want_lp)
                offsets[job.index] = len(self._echo(job))
            if want_lp is not None:
                tail, offsets[job.index] = completion_logprobs(out.new_logprobs or [], self.text_of, want_lp,
                                                               offsets[job.index])
                logprobs = merge(head, tail)
            if text or out.finished or (logprobs is not None and logprobs.tokens):
                choice = CompletionChoice(index=job.index, text=text, logprobs=logprobs,
                                          finish_reason=out.finish_reason if out.finished else None)
                yield self._chunk([choice], usage.usage() if continuous else None)
        if include_usage:
            yield self._chunk([], usage.usage())


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Generate text continuing each prompt.

    Returns a ``text_completion`` object (or an SSE stream of them ending in ``data: [DONE]``).
    Errors (OpenAI body): 404 unknown model; 400 bad fields, unsupported fields or prompt +
    max_tokens beyond the context length; 429 with ``Retry-After`` when the queue is full; 503
    when the model cannot be loaded.
    """
    return http_response(await CompletionServing(request, body).create())
