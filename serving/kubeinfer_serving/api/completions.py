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
from kubeinfer_serving.api.prompts import completion_prompts, resolve_max_tokens
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
    UsageCounter,
    acquire,
    cache_salt,
    new_id,
    now,
    resolve_model_name,
    resolve_priority,
    respond,
    result_cache_key,
)
from kubeinfer_serving.api.sse import sse_event
from kubeinfer_serving.api.structured import compile_guide, forbids_additional_properties, grammar_spec
from kubeinfer_serving.engine.sampling import MAX_LOGPROBS
from kubeinfer_serving.registry.protocol import ModelKind

router = APIRouter(route_class=OffLoopJSONRoute)


def check_request(request: Request, body: CompletionRequest) -> None:
    """Refuse what this route cannot honour, naming the field (400).

    Raises:
        APIError: unimplemented fields that would change the output (others are ignored and
            reported, :mod:`.fields`); ``best_of`` other than ``n``; ``suffix``;
            ``logprobs`` outside [0, 20]; ``max_tokens: 0`` without ``echo``; ``stream_options``
            without ``stream``.
    """
    check_fields(request, body, defaults={"add_special_tokens": True})
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
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be given with stream: true", param="stream_options",
                       code="invalid_value")
    if body.spaces_between_special_tokens is False:
        raise APIError(400, "spaces_between_special_tokens false is not supported by this server",
                       param="spaces_between_special_tokens", code="unsupported_parameter")


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Generate text continuing each prompt.

    Returns a ``text_completion`` object (or an SSE stream of them ending in ``data: [DONE]``).
    Errors (OpenAI body): 404 unknown model; 400 bad fields, unsupported fields or prompt +
    max_tokens beyond the context length; 429 with ``Retry-After`` when the queue is full; 503
    when the model cannot be loaded.
    """
    check_request(request, body)
    num_prompts = len(body.prompt) if isinstance(body.prompt, list) and body.prompt and not isinstance(
        body.prompt[0], int) else 1
    check_fanout(request, num_prompts, body.n)
    structured = grammar_spec(body, forbids_additional_properties(request, body))
    response_id, created = new_id("cmpl"), now()
    async with AsyncExitStack() as stack:
        model = resolve_model_name(request, body.model, ModelKind.GENERATE)
        served = await acquire(request, stack, model, ModelKind.GENERATE)
        priority = resolve_priority(request, body, served)
        salt = cache_salt(request, body)
        guide = (await compile_guide(request, served.engine, served.tokenizer, structured[1], structured[0])
                 if structured else None)
        prompts = await asyncio.to_thread(completion_prompts, served.tokenizer, body.prompt, served.max_model_len)
        bad = await asyncio.to_thread(bad_words_token_ids, served.tokenizer, body.bad_words) if body.bad_words else None
        if isinstance(body.prompt, str):
            echo_texts = [body.prompt]
        elif isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            echo_texts = list(body.prompt)
        else:
            echo_texts = [served.tokenizer.decode(ids) for ids in prompts]
        want_lp = body.logprobs
        jobs: list[Job] = []
        for p, ids in enumerate(prompts):
            max_tokens = resolve_max_tokens(body.max_tokens, len(ids), served.max_model_len, param="prompt")
            for j in range(body.n):
                index = p * body.n + j
                params = sampling_params(body, max_tokens, j, priority, salt, bad_words_ids=bad,
                                         guide=guide, logprobs=want_lp,
                                         prompt_logprobs=want_lp if body.echo and want_lp is not None else None)
                jobs.append(Job(index, p, f"{response_id}-{index}", ids, params))
        text_of = TokenText(served.tokenizer, bool(body.return_tokens_as_token_ids))

        def echo(job: Job) -> str:
            return echo_texts[job.prompt_index] if body.echo else ""

        def build(results: list[ChoiceResult], usage: Usage) -> CompletionResponse:
            choices = []
            for job in jobs:
                r = results[job.index]
                logprobs = None
                if want_lp is not None:
                    head, offset = CompletionLogprobs(), 0
                    if body.echo and r.prompt_logprobs is not None:
                        head, _ = prompt_completion_logprobs(job.prompt_token_ids, r.prompt_logprobs, text_of, want_lp)
                        offset = len(echo(job))
                    tail, _ = completion_logprobs(r.logprobs, text_of, want_lp, offset)
                    logprobs = merge(head, tail)
                choices.append(CompletionChoice(index=job.index, text=echo(job) + r.text, logprobs=logprobs,
                                                finish_reason=r.finish_reason))
            return CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage,
                                      system_fingerprint=SYSTEM_FINGERPRINT)

        continuous = body.stream_options is not None and body.stream_options.continuous

        def chunk(index: int, text: str, reason: str | None, logprobs: CompletionLogprobs | None = None,
                  usage: Usage | None = None) -> str:
            choice = CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=logprobs)
            return sse_event(CompletionResponse(id=response_id, created=created, model=model, choices=[choice],
                                                usage=usage, system_fingerprint=SYSTEM_FINGERPRINT))

        async def events(run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
            echoed: set[int] = set()
            offsets: dict[int, int] = {}
            async for job, out in run.outputs():
                usage.update(job, out)
                text = out.new_text
                logprobs = None
                head = CompletionLogprobs()
                if job.index not in echoed:
                    echoed.add(job.index)
                    text = echo(job) + text
                    if want_lp is not None and body.echo and out.prompt_logprobs is not None:
                        head, _ = prompt_completion_logprobs(job.prompt_token_ids, out.prompt_logprobs, text_of,
                                                             want_lp)
                    offsets[job.index] = len(echo(job))
                if want_lp is not None:
                    tail, offsets[job.index] = completion_logprobs(out.new_logprobs or [], text_of, want_lp,
                                                                   offsets[job.index])
                    logprobs = merge(head, tail)
                if text or out.finished or (logprobs is not None and logprobs.tokens):
                    yield chunk(job.index, text, out.finish_reason if out.finished else None, logprobs,
                                usage.usage() if continuous else None)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse_event(CompletionResponse(id=response_id, created=created, model=model, choices=[],
                                                   usage=usage.usage(), system_fingerprint=SYSTEM_FINGERPRINT))

        return await respond(request, stack, served, jobs, stream=body.stream, build_response=build,
                             stream_events=events, cache_key=result_cache_key(request, "completions", body, served),
                             include_usage=bool(body.stream_options and body.stream_options.include_usage),
                             continuous_usage=continuous)
