"""``POST /v1/completions`` (OpenAI's legacy text completions), streaming and not.

Several prompts and ``n > 1`` are served as separate engine requests; choice ``index`` is
``prompt_index * n + j``, as OpenAI numbers them. ``echo`` prepends the prompt text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kubeinfer_serving.api.errors import APIError
from kubeinfer_serving.api.generation import (
    GenerationRun,
    Job,
    check_fanout,
    reject_unsupported,
    sampling_params,
)
from kubeinfer_serving.api.prompts import completion_prompts, resolve_max_tokens
from kubeinfer_serving.api.schemas import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from kubeinfer_serving.api.serving import (
    UsageCounter,
    acquire,
    cache_salt,
    new_id,
    now,
    resolve_priority,
    respond,
    result_cache_key,
)
from kubeinfer_serving.api.sse import sse_event
from kubeinfer_serving.registry.protocol import ModelKind

router = APIRouter()


def _reject_unsupported(body: CompletionRequest) -> None:
    reject_unsupported(body)
    if body.logprobs is not None:
        raise APIError(400, "logprobs is not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported by this server", param="best_of",
                       code="unsupported_parameter")
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_parameter")


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Generate text continuing each prompt.

    Returns a ``text_completion`` object (or an SSE stream of them ending in ``data: [DONE]``).
    Errors (OpenAI body): 404 unknown model; 400 bad fields, unsupported fields or prompt +
    max_tokens beyond the context length; 429 with ``Retry-After`` when the queue is full; 503
    when the model cannot be loaded.
    """
    _reject_unsupported(body)
    num_prompts = len(body.prompt) if isinstance(body.prompt, list) and body.prompt and not isinstance(
        body.prompt[0], int) else 1
    check_fanout(request, num_prompts, body.n)
    response_id, created = new_id("cmpl"), now()
    async with AsyncExitStack() as stack:
        served = await acquire(request, stack, body.model, ModelKind.GENERATE)
        priority = resolve_priority(request, body, served)
        salt = cache_salt(request, body)
        prompts = await asyncio.to_thread(completion_prompts, served.tokenizer, body.prompt, served.max_model_len)
        if isinstance(body.prompt, str):
            echo_texts = [body.prompt]
        elif isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            echo_texts = list(body.prompt)
        else:
            echo_texts = [served.tokenizer.decode(ids) for ids in prompts]
        jobs: list[Job] = []
        for p, ids in enumerate(prompts):
            max_tokens = resolve_max_tokens(body.max_tokens, len(ids), served.max_model_len, param="prompt")
            for j in range(body.n):
                index = p * body.n + j
                jobs.append(Job(index, p, f"{response_id}-{index}", ids, sampling_params(body, max_tokens, j, priority, salt)))

        def echo(job: Job) -> str:
            return echo_texts[job.prompt_index] if body.echo else ""

        def build(texts: list[str], reasons: list[str | None], usage: Usage) -> CompletionResponse:
            choices = [
                CompletionChoice(index=job.index, text=echo(job) + texts[job.index], finish_reason=reasons[job.index])
                for job in jobs
            ]
            return CompletionResponse(id=response_id, created=created, model=body.model, choices=choices, usage=usage)

        def chunk(index: int, text: str, reason: str | None) -> str:
            choice = CompletionChoice(index=index, text=text, finish_reason=reason)
            return sse_event(CompletionResponse(id=response_id, created=created, model=body.model, choices=[choice]))

        async def events(run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
            echoed: set[int] = set()
            async for job, out in run.outputs():
                usage.update(job, out)
                text = out.new_text
                if job.index not in echoed:
                    echoed.add(job.index)
                    text = echo(job) + text
                if text or out.finished:
                    yield chunk(job.index, text, out.finish_reason if out.finished else None)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse_event(CompletionResponse(id=response_id, created=created, model=body.model, choices=[],
                                                   usage=usage.usage()))

        return await respond(request, stack, served, jobs, stream=body.stream, build_response=build,
                             stream_events=events, cache_key=result_cache_key(request, "completions", body, served),
                             include_usage=bool(body.stream_options and body.stream_options.include_usage))
