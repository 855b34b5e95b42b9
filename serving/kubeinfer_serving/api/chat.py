"""``POST /v1/chat/completions``, streaming and not.

The conversation is rendered with the model's chat template (with the request's ``tools``,
``add_generation_prompt``/``continue_final_message`` and ``chat_template_kwargs``). Without
``max_completion_tokens`` or ``max_tokens`` the reply may use the rest of the context
(``max_model_len - prompt``), as vLLM does. A stream opens with a
``{"role": "assistant", "content": ""}`` delta per choice, as OpenAI's does. Tool calls
(:mod:`kubeinfer_serving.api.tools`) come back as ``message.tool_calls`` with
``finish_reason: "tool_calls"``; streamed, each call is a delta with its id, type and name
followed by ``arguments`` fragments as the model writes them (:class:`~.tools.ToolCallStream`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

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
from kubeinfer_serving.api.logprobs import TokenText, chat_logprobs
from kubeinfer_serving.api.prompts import _message_text, chat_prompt, resolve_max_tokens
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
from kubeinfer_serving.api.tools import ToolCallStream, ToolPlan, parse_tool_calls, parser_for, plan_tools
from kubeinfer_serving.engine.sampling import MAX_LOGPROBS
from kubeinfer_serving.registry.protocol import ModelKind, ServedModel

router = APIRouter(route_class=OffLoopJSONRoute)


def check_request(request: Request, body: ChatCompletionRequest) -> None:
    """Refuse what this route cannot honour, naming the field (400).

    Raises:
        APIError: unimplemented fields that would change the output (others are ignored and
            reported, :mod:`.fields`); ``top_logprobs`` without ``logprobs`` or
            above 20; ``stream_options`` without ``stream``; both ``add_generation_prompt`` and
            ``continue_final_message``.
    """
    check_fields(request, body, defaults={"add_special_tokens": False})
    if body.top_logprobs is not None and body.top_logprobs > 0 and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if body.top_logprobs is not None and body.top_logprobs > MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs",
                       code="invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be given with stream: true", param="stream_options",
                       code="invalid_value")
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false",
                       param="continue_final_message", code="invalid_value")
    if body.spaces_between_special_tokens is False:
        raise APIError(400, "spaces_between_special_tokens false is not supported by this server",
                       param="spaces_between_special_tokens", code="unsupported_parameter")


@dataclass
class ChatRun:
    """A chat request made ready to run: the model acquired, the prompt rendered, the jobs built.

    Attributes:
        model: the model's name (the response's ``model``).
        served: the acquired model (held until the response is over).
        jobs: one engine request per choice.
        plan: how the reply uses tools (:func:`~kubeinfer_serving.api.tools.plan_tools`).
        parser: the model's tool-call format (:func:`~kubeinfer_serving.api.tools.parser_for`).
        text_of: token id -> shown text, for log-probabilities.
    """

    model: str
    served: ServedModel
    jobs: list[Job]
    plan: ToolPlan
    parser: str
    text_of: TokenText


async def prepare_chat(request: Request, stack: AsyncExitStack, body: ChatCompletionRequest, response_id: str, *,
                       context_param: str = "messages") -> ChatRun:
    """Everything between a checked chat request and its engine jobs: tools and structured-output
    plan, the model (acquired on ``stack``), priority and cache salt, the grammar, the prompt
    (rendered with the chat template), the output budget and the sampling parameters.

    Shared by ``/v1/chat/completions`` and ``/v1/responses`` (which converts its input into a chat request).

    Args:
        response_id: prefix of the engine request ids.
        context_param: the request field named when the prompt does not fit the context.

    Raises:
        APIError: 400 for bad tools, constraints or prompts (naming the field), 404/503 from the provider.
    """
    closed = forbids_additional_properties(request, body)
    plan = plan_tools(body, closed)
    structured = grammar_spec(body, closed)
    if plan.guide is not None:
        if structured is not None:
            raise APIError(400, f"tool_choice {plan.mode} cannot be combined with {structured[0]}",
                           param=structured[0], code="invalid_value")
        structured = ("tool_choice", plan.guide)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    want_lp = (body.top_logprobs or 0) if body.logprobs else None
    model = resolve_model_name(request, body.model, ModelKind.GENERATE)
    served = await acquire(request, stack, model, ModelKind.GENERATE)
    priority = resolve_priority(request, body, served)
    salt = cache_salt(request, body)
    tok = served.tokenizer
    guide = await compile_guide(request, served.engine, tok, structured[1], structured[0]) if structured else None
    ids = await asyncio.to_thread(
        chat_prompt, tok, body.messages, served.max_model_len,
        parse_special_tokens=request.app.state.settings.parse_special_tokens_in_chat, tools=plan.tools or None,
        add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
        chat_template_kwargs=body.chat_template_kwargs, param=context_param)
    max_tokens = resolve_max_tokens(requested, len(ids), served.max_model_len, param=context_param)
    bad = await asyncio.to_thread(bad_words_token_ids, tok, body.bad_words) if body.bad_words else None
    jobs = [Job(j, 0, f"{response_id}-{j}", ids,
                sampling_params(body, max_tokens, j, priority, salt, bad_words_ids=bad, guide=guide,
                                logprobs=want_lp))
            for j in range(body.n)]
    parser = parser_for(tok, request.app.state.settings.tool_call_parser)
    return ChatRun(model, served, jobs, plan, parser, TokenText(tok, bool(body.return_tokens_as_token_ids)))


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Generate the assistant's next message.

    Returns a ``chat.completion`` object (or an SSE stream of ``chat.completion.chunk`` ending in
    ``data: [DONE]``). Errors as for ``/v1/completions``; ``param`` is ``messages`` for context overflow.
    """
    check_request(request, body)
    check_fanout(request, 1, body.n)
    response_id, created = new_id("chatcmpl"), now()
    want_lp = (body.top_logprobs or 0) if body.logprobs else None
    async with AsyncExitStack() as stack:
        prepared = await prepare_chat(request, stack, body, response_id)
        model, served, jobs, plan, parser, text_of = (prepared.model, prepared.served, prepared.jobs, prepared.plan,
                                                      prepared.parser, prepared.text_of)
        last = body.messages[-1]
        echo = _message_text(last) if body.echo and last.role == "assistant" else ""

        def build(results: list[ChoiceResult], usage: Usage) -> ChatCompletionResponse:
            choices = []
            for j in jobs:
                r = results[j.index]
                content, calls = parse_tool_calls(r.text, plan, parser)
                reason = "tool_calls" if calls and r.finish_reason == "stop" else r.finish_reason
                if content is not None:
                    content = echo + content
                message = AssistantMessage(content=content, tool_calls=calls or None)
                lp = chat_logprobs(r.logprobs, text_of, want_lp) if want_lp is not None else None
                choices.append(ChatChoice(index=j.index, message=message, logprobs=lp, finish_reason=reason))
            return ChatCompletionResponse(id=response_id, created=created, model=model, choices=choices,
                                          usage=usage, system_fingerprint=SYSTEM_FINGERPRINT)

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices,
                                                 usage=usage, system_fingerprint=SYSTEM_FINGERPRINT))

        continuous = body.stream_options is not None and body.stream_options.continuous

        async def events(run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
            def chunk_of(choices: list[ChatChunkChoice]) -> str:
                return chunk(choices, usage.usage() if continuous else None)

            yield chunk_of([ChatChunkChoice(index=j.index, delta=DeltaMessage(role="assistant", content=echo))
                            for j in jobs])
            streams = {j.index: ToolCallStream(plan, parser) for j in jobs}
            async for job, out in run.outputs():
                usage.update(job, out)
                ts = streams[job.index]
                content = ts.feed(out.new_text)
                lp = chat_logprobs(out.new_logprobs or [], text_of, want_lp) if want_lp is not None else None
                if not out.finished:
                    if content or (lp is not None and lp.content):
                        yield chunk_of([ChatChunkChoice(index=job.index, delta=DeltaMessage(content=content or None),
                                                        logprobs=lp)])
                    for delta in ts.call_deltas():
                        yield chunk_of([ChatChunkChoice(index=job.index, delta=DeltaMessage(tool_calls=[delta]))])
                    continue
                rest, calls = ts.finish()
                content += rest
                reason = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
                if content or (lp is not None and lp.content):
                    yield chunk_of([ChatChunkChoice(index=job.index, delta=DeltaMessage(content=content or None),
                                                    logprobs=lp)])
                for delta in ts.finish_deltas(calls):
                    yield chunk_of([ChatChunkChoice(index=job.index, delta=DeltaMessage(tool_calls=[delta]))])
                yield chunk_of([ChatChunkChoice(index=job.index, delta=DeltaMessage(), finish_reason=reason)])
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], usage.usage())

        return await respond(request, stack, served, jobs, stream=body.stream, build_response=build,
                             stream_events=events, cache_key=result_cache_key(request, "chat", body, served),
                             include_usage=bool(body.stream_options and body.stream_options.include_usage),
                             continuous_usage=continuous)
