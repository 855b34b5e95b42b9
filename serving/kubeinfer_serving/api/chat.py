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
from kubeinfer_serving.api.prompts import _message_text, chat_prompt, check_template_flags
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
from kubeinfer_serving.api.tools import ToolCallStream, ToolPlan, parse_tool_calls, parser_for, plan_tools
from kubeinfer_serving.engine.sampling import MAX_LOGPROBS
from kubeinfer_serving.engine.validation import output_budget
from kubeinfer_serving.registry.protocol import ModelKind, ServedModel

router = APIRouter(route_class=OffLoopJSONRoute)


class ChatServing(GenerationServing):
    """One ``/v1/chat/completions`` request: checked, prepared (template, tools, grammar, sampling),
    then answered by :meth:`full_response` (a ``chat.completion``) or :meth:`stream_events`
    (``chat.completion.chunk`` events).

    The Responses API's serving class derives from it: it sets :attr:`chat_body` to the chat
    request its input means and prepares it the same way.

    Args:
        request: the HTTP request.
        body: the parsed request body.
    """

    cache_route: str | None = "chat"
    #: The request field named when the prompt does not fit the context.
    context_param = "messages"

    id_prefix = "chatcmpl"
    #: The chat request to run: the body itself here; the Responses API converts its own in :meth:`check`.
    chat_body: ChatCompletionRequest
    #: What :meth:`prepare` finds: tools plan, tool-call format, token texts, echoed text, top
    #: alternatives per output token (None: no log-probabilities).
    plan = ToolPlan([], "none")
    parser = ""
    text_of: TokenText | None = None
    echo = ""
    want_logprobs: int | None = None

    def check(self) -> None:
        """Refuse what this route cannot honour, naming the field (400), and enforce the fan-out cap.

        Raises:
            APIError: unimplemented fields that would change the output (others are ignored and
                reported, :mod:`.fields`); ``top_logprobs`` without ``logprobs`` or above 20;
                ``stream_options`` without ``stream``; both ``add_generation_prompt`` and
                ``continue_final_message``; more choices than ``--max-jobs-per-request``.
        """
        body = self.chat_body = getattr(self, "chat_body", self.body)
        check_fields(self.request, body, defaults={"add_special_tokens": False})
        if body.top_logprobs is not None and body.top_logprobs > 0 and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if body.top_logprobs is not None and body.top_logprobs > MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}]", param="top_logprobs",
                           code="invalid_value")
        check_template_flags(body.add_generation_prompt, body.continue_final_message)
        check_stream_fields(body)
        check_fanout(self.request, 1, body.n)

    async def prepare(self, stack: AsyncExitStack) -> tuple[ServedModel, list[Job]]:
        """Everything between a checked chat request and its engine jobs: tools and structured-output
        plan, the model (acquired on ``stack``), priority and cache salt, the grammar, the prompt
        (rendered with the chat template), the output budget and the sampling parameters.

        Raises:
            APIError: 400 for bad tools, constraints or prompts (naming the field), 404/503 from the provider.
        """
        request, body = self.request, self.chat_body
        closed = forbids_additional_properties(request, body)
        plan = plan_tools(body, closed)
        structured = grammar_spec(body, closed)
        if plan.guide is not None:
            if structured is not None:
                raise APIError(400, f"tool_choice {plan.mode} cannot be combined with {structured[0]}",
                               param=structured[0], code="invalid_value")
            structured = ("tool_choice", plan.guide)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        self.want_logprobs = (body.top_logprobs or 0) if body.logprobs else None
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
            chat_template_kwargs=body.chat_template_kwargs, param=self.context_param)
        max_tokens = output_budget(served.max_model_len, requested, len(ids), param=self.context_param)
        bad = await asyncio.to_thread(bad_words_token_ids, tok, body.bad_words) if body.bad_words else None
        jobs = [Job(j, 0, f"{self.response_id}-{j}", ids,
                    sampling_params(body, max_tokens, j, priority, salt, bad_words_ids=bad, guide=guide,
                                    logprobs=self.want_logprobs))
                for j in range(body.n)]
        self.model, self.plan = model, plan
        self.parser = parser_for(tok, request.app.state.settings.tool_call_parser)
        self.text_of = TokenText(tok, bool(body.return_tokens_as_token_ids))
        last = body.messages[-1]
        self.echo = _message_text(last) if body.echo and last.role == "assistant" else ""
        return served, jobs

    def full_response(self, results: list[ChoiceResult], usage: Usage) -> ChatCompletionResponse:
        """The ``chat.completion`` object: per choice its message (content and/or tool calls) and finish reason."""
        choices = []
        want_lp = self.want_logprobs
        for index, r in enumerate(results):
            content, calls = parse_tool_calls(r.text, self.plan, self.parser)
            reason = "tool_calls" if calls and r.finish_reason == "stop" else r.finish_reason
            if content is not None:
                content = self.echo + content
            message = AssistantMessage(content=content, tool_calls=calls or None)
            lp = chat_logprobs(r.logprobs, self.text_of, want_lp) if want_lp is not None else None
            choices.append(ChatChoice(index=index, message=message, logprobs=lp, finish_reason=reason))
        return ChatCompletionResponse(id=self.response_id, created=self.created, model=self.model, choices=choices,
                                      usage=usage, system_fingerprint=SYSTEM_FINGERPRINT)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse_event(ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model,
                                             choices=choices, usage=usage, system_fingerprint=SYSTEM_FINGERPRINT))

    async def stream_events(self, run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
        """``chat.completion.chunk`` events: a role delta per choice, content deltas as tokens come,
        tool-call deltas and the finish reason at each choice's end, the usage chunk when asked."""
        include_usage, continuous = self.stream_options()
        want_lp = self.want_logprobs

        def chunk_of(choices: list[ChatChunkChoice]) -> str:
            return self._chunk(choices, usage.usage() if continuous else None)

        yield chunk_of([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=self.echo))
                        for j in range(self.chat_body.n)])
        streams = {j: ToolCallStream(self.plan, self.parser) for j in range(self.chat_body.n)}
        async for job, out in run.outputs():
            usage.update(job, out)
            ts = streams[job.index]
            content = ts.feed(out.new_text)
            lp = chat_logprobs(out.new_logprobs or [], self.text_of, want_lp) if want_lp is not None else None
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
        if include_usage:
            yield self._chunk([], usage.usage())


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Generate the assistant's next message.

    Returns a ``chat.completion`` object (or an SSE stream of ``chat.completion.chunk`` ending in
    ``data: [DONE]``). Errors as for ``/v1/completions``; ``param`` is ``messages`` for context overflow.
    """
    return http_response(await ChatServing(request, body).create())
