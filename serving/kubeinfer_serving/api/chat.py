"""``POST /v1/chat/completions``, streaming and not.

The conversation is rendered with the model's chat template. Without ``max_completion_tokens``
or ``max_tokens`` the reply may use the rest of the context (``max_model_len - prompt``), as
vLLM does. A stream opens with a ``{"role": "assistant", "content": ""}`` delta per choice,
as OpenAI's does.
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
from kubeinfer_serving.api.prompts import chat_prompt, resolve_max_tokens
from kubeinfer_serving.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
)
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


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    reject_unsupported(body)
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs is not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    if body.tools:
        raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported_parameter")
    if body.tool_choice not in (None, "none"):
        raise APIError(400, "tool_choice is not supported by this server", param="tool_choice",
                       code="unsupported_parameter")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Generate the assistant's next message.

    Returns a ``chat.completion`` object (or an SSE stream of ``chat.completion.chunk`` ending in
    ``data: [DONE]``). Errors as for ``/v1/completions``; ``param`` is ``messages`` for context overflow.
    """
    _reject_unsupported(body)
    check_fanout(request, 1, body.n)
    response_id, created = new_id("chatcmpl"), now()
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    async with AsyncExitStack() as stack:
        served = await acquire(request, stack, body.model, ModelKind.GENERATE)
        priority = resolve_priority(request, body, served)
        salt = cache_salt(request, body)
        ids = await asyncio.to_thread(chat_prompt, served.tokenizer, body.messages, served.max_model_len,
                                      parse_special_tokens=request.app.state.settings.parse_special_tokens_in_chat)
        max_tokens = resolve_max_tokens(requested, len(ids), served.max_model_len, param="messages")
        jobs = [Job(j, 0, f"{response_id}-{j}", ids, sampling_params(body, max_tokens, j, priority, salt)) for j in range(body.n)]

        def build(texts: list[str], reasons: list[str | None], usage: Usage) -> ChatCompletionResponse:
            choices = [
                ChatChoice(index=j.index, message=AssistantMessage(content=texts[j.index]),
                           finish_reason=reasons[j.index])
                for j in jobs
            ]
            return ChatCompletionResponse(id=response_id, created=created, model=body.model, choices=choices,
                                          usage=usage)

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=response_id, created=created, model=body.model,
                                                 choices=choices, usage=usage))

        async def events(run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
            yield chunk([ChatChunkChoice(index=j.index, delta=DeltaMessage(role="assistant", content=""))
                         for j in jobs])
            async for job, out in run.outputs():
                usage.update(job, out)
                if out.new_text or out.finished:
                    delta = DeltaMessage(content=out.new_text or None)
                    yield chunk([ChatChunkChoice(index=job.index, delta=delta,
                                                 finish_reason=out.finish_reason if out.finished else None)])
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], usage.usage())

        return await respond(request, stack, served, jobs, stream=body.stream, build_response=build,
                             stream_events=events, cache_key=result_cache_key(request, "chat", body, served),
                             include_usage=bool(body.stream_options and body.stream_options.include_usage))
