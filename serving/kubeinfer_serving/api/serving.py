"""What the generation endpoints share: :class:`GenerationServing` (the base of the serving classes
of ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/responses``), its results and their
HTTP wrapping, acquiring the model, usage, ids.

The model acquired from the provider is held (busy, never evicted) until the response is fully
sent: for a non-streaming request until the handler returns, for a stream until its last event
or the client's disconnect (:class:`~kubeinfer_serving.api.sse.SSEResponse` releases it).
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from kubeinfer_serving import __version__
from kubeinfer_serving.api import request_log, request_trace
from kubeinfer_serving.api.admission import FairAdmission, Ticket
from kubeinfer_serving.api.auth import identity_of
from kubeinfer_serving.api.errors import APIError, error_body, to_api_error
from kubeinfer_serving.api.generation import GenerationRun, Job, until_disconnect
from kubeinfer_serving.api.result_cache import HEADER as RESULT_CACHE_HEADER
from kubeinfer_serving.api.result_cache import ResultCache, replay
from kubeinfer_serving.api.schemas import PromptTokensDetails, Usage
from kubeinfer_serving.api.sse import DONE, SSEResponse, sse_event
from kubeinfer_serving.engine.outputs import RequestOutput, TokenLogprob
from kubeinfer_serving.registry.protocol import ModelKind, ServedModel

#: ``system_fingerprint`` of every response: the server build (OpenAI: the backend configuration).
SYSTEM_FINGERPRINT = f"kubeinfer-{__version__}"


def new_id(prefix: str) -> str:
    """A response id like OpenAI's: ``cmpl-<32 hex>`` / ``chatcmpl-<32 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in whole seconds (the ``created`` field)."""
    return int(time.time())


def resolve_model_name(request: Request, name: str | None, kind: ModelKind) -> str:
    """``name``, or when the request left ``model`` out, the one model of ``kind`` the server serves (as vLLM).

    Raises:
        APIError: 400 ``param=model``, ``missing_required_parameter``, when ``model`` is missing
            and the server serves several (or no) models of that kind.
    """
    if name:
        return name
    names = [m.name for m in request.app.state.provider.list_models() if m.kind is kind]
    if len(names) != 1:
        raise APIError(400, f"model is required: this server serves {len(names)} models of this kind "
                       f"({', '.join(names)})", param="model", code="missing_required_parameter")
    return names[0]


async def acquire(request: Request, stack: AsyncExitStack, name: str | None, kind: ModelKind) -> ServedModel:
    """Acquire model ``name`` from the app's provider on ``stack`` and check it serves ``kind``.

    Args:
        name: the model; None picks the only model of ``kind`` (see :func:`resolve_model_name`).

    Raises:
        ModelNotFoundError, ModelUnavailableError: from the provider (404, 503).
        APIError: 400 ``model_not_supported`` when the model is of the other kind; 400 when
            ``name`` is None and there is no single model to pick.
    """
    name = resolve_model_name(request, name, kind)
    request_log.note(request.scope, model=name)
    served = await stack.enter_async_context(request.app.state.provider.acquire(name))
    if kind is ModelKind.GENERATE and getattr(served, "engine", None) is None:
        raise APIError(400, f"Model {name!r} is an embedding model; use /v1/embeddings", param="model",
                       code="model_not_supported")
    if kind is ModelKind.EMBED and getattr(served, "embedder", None) is None:
        raise APIError(400, f"Model {name!r} does not serve embeddings", param="model", code="model_not_supported")
    return served


@dataclass
class ChoiceResult:
    """Everything one choice produced, for a non-streamed response.

    Attributes:
        text: the output text.
        finish_reason: why it ended.
        token_ids: the output token ids.
        logprobs: one entry per output token (when asked for).
        prompt_logprobs: per prompt token, first None (when asked for).
    """

    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, out: RequestOutput) -> None:
        """Append one engine output (a delta) of this choice."""
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        if out.new_logprobs:
            self.logprobs += out.new_logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason


class UsageCounter:
    """Sums token counts over the jobs of a request: prompts once each, outputs over all choices."""

    def __init__(self, jobs: list[Job]) -> None:
        self._prompt = {j.prompt_index: len(j.prompt_token_ids) for j in jobs}
        self._first_of_prompt = {j.prompt_index: j.index for j in reversed(jobs)}
        self._output: dict[int, int] = {}
        self._cached: dict[int, int] = {}

    def update(self, job: Job, out: RequestOutput) -> None:
        """Record the latest cumulative counts of ``job``."""
        self._output[job.index] = out.num_output_tokens
        if self._first_of_prompt[job.prompt_index] == job.index:
            self._cached[job.prompt_index] = out.num_cached_tokens

    def usage(self) -> Usage:
        """The ``usage`` object: prompt, completion and total tokens, plus prefix-cache hits."""
        prompt = sum(self._prompt.values())
        completion = sum(self._output.values())
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached.values())),
        )


def resolve_priority(request: Request, body: Any, served: ServedModel) -> int:
    """The request's scheduling priority: its ``priority`` field, else its tenant's default.

    Under the ``fcfs`` policy every request has priority 0 (as in vLLM, a non-zero ``priority``
    is then an error: the model's rule, :meth:`~kubeinfer_serving.engine.validation.RequestValidator.check_priority`).
    With API keys on, a tenant may not ask for a priority below its floor (``minPriority`` in the
    keys file, default its own ``priority``), so no tenant can jump the others' queues; without
    keys (one anonymous tenant) any value is allowed.

    Raises:
        InvalidRequestError: 400 ``unsupported_parameter`` for a non-zero ``priority`` on an ``fcfs`` model.
        APIError: 400 ``invalid_value`` for a priority below the tenant's floor.
    """
    validator = served.engine.validator
    by_priority = validator.scheduling_policy == "priority"
    if body.priority is not None:
        validator.check_priority(body.priority)
        tenant = identity_of(request.scope).tenant
        if by_priority and request.app.state.keys.enabled and body.priority < tenant.priority_floor:
            raise APIError(400, f"priority must be at least {tenant.priority_floor} for tenant {tenant.name!r} "
                           "(lower values run first; the tenant's minPriority)", param="priority",
                           code="invalid_value")
        return body.priority
    return identity_of(request.scope).tenant.priority if by_priority else 0


def check_stream_fields(body: Any) -> None:
    """The output-format rules every generation endpoint with these fields shares.

    Raises:
        APIError: 400 ``stream_options`` without ``stream``; 400 ``unsupported_parameter`` for
            ``spaces_between_special_tokens: false``.
    """
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be given with stream: true", param="stream_options",
                       code="invalid_value")
    if body.spaces_between_special_tokens is False:
        raise APIError(400, "spaces_between_special_tokens false is not supported by this server",
                       param="spaces_between_special_tokens", code="unsupported_parameter")


def result_cache_key(request: Request, route: str, body: Any, served: ServedModel) -> str | None:
    """The result-cache key of this request, or None when it is not cacheable (see :mod:`.result_cache`)."""
    cache: ResultCache = request.app.state.result_cache
    tenant = identity_of(request.scope, request.app.state.keys).tenant.name
    return cache.key(route, tenant, served.name, getattr(served.engine, "instance_id", ""), body)


def cache_salt(request: Request, body: Any) -> str | None:
    """The prefix-cache salt of a request: its tenant (when API keys are on) and its own ``cache_salt``.

    Tenants never share cached blocks, so one cannot learn another's prompts from cache timing;
    requests of one tenant still share them. Without keys and without ``cache_salt`` there is no
    salt (every request may share).
    """
    keys = request.app.state.keys
    tenant = identity_of(request.scope, keys).tenant.name if keys.enabled else None
    own = getattr(body, "cache_salt", None)
    if tenant is None and own is None:
        return None
    return f"{tenant or ''}\x00{own or ''}"


async def admit(request: Request, served: ServedModel, jobs: list[Job]) -> Ticket | None:
    """Pass the tenant's limits and fair admission (:mod:`.admission`) for ``jobs`` on ``served``.

    Returns:
        the ticket to release when the jobs are done (None when fair admission is off).

    Raises:
        APIError: 429 (tenant rate, tenant queue, model queue); ClientDisconnected while waiting.
    """
    admission: FairAdmission = request.app.state.admission
    tenant = identity_of(request.scope).tenant
    config = getattr(getattr(served.engine, "engine", None), "config", None)  # the EngineConfig, if any
    prompts = {j.prompt_index: len(j.prompt_token_ids) for j in jobs}
    if not admission.enabled or config is None:
        admission.check_rate(tenant)
        admission.charge(tenant, sum(prompts.values()), "prompt")
        return None
    ticket = admission.try_admit(served.name, config.max_num_seqs, config.max_waiting_requests, tenant, len(jobs))
    if ticket is None:
        priority = jobs[0].params.priority if jobs else 0
        ticket = await until_disconnect(request, admission.admit(
            served.name, config.max_num_seqs, config.max_waiting_requests, tenant, len(jobs), priority))
    admission.charge(tenant, sum(prompts.values()), "prompt")
    return ticket


@dataclass
class FullResult:
    """A whole JSON response of a serving class.

    Attributes:
        body: the response body (JSON-ready).
        headers: extra response headers (e.g. the result cache's ``hit``/``miss``).
    """

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamResult:
    """A streamed response of a serving class: its SSE events, and what to run when it ends.

    Attributes:
        events: the ``text/event-stream`` events, each a complete event.
        on_close: run once however the stream ends (aborts the engine requests, releases the
            model); None for a stream that holds nothing (a replayed cache hit).
        headers: extra response headers.
        stall_timeout: seconds one event may wait to be sent (None: no limit).
    """

    events: AsyncIterator[str] | Iterator[str]
    on_close: Callable[[], Awaitable[None]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stall_timeout: float | None = None


def http_response(result: FullResult | StreamResult) -> Response:
    """Wrap a serving class's result for the route: a JSONResponse, or an SSE stream."""
    if isinstance(result, FullResult):
        return JSONResponse(result.body, headers=result.headers or None)
    if result.on_close is None:
        return StreamingResponse(result.events, media_type="text/event-stream",
                                 headers={**result.headers, "Cache-Control": "no-cache"})
    return SSEResponse(result.events, result.on_close, stall_timeout=result.stall_timeout)


class GenerationServing(ABC):
    """One generation request (a completion, a chat completion, a response), vLLM's serving-class shape.

    :meth:`create` checks the request (:meth:`check`), prepares its engine jobs (:meth:`prepare`:
    the model acquired, the prompt tokenized, the sampling parameters built), answers from the
    result cache when it can, passes fair admission, runs the jobs on the model's engine and
    answers with the subclass's full generator (:meth:`full_response`) or its streaming
    generator (:meth:`stream_events`). The model stays acquired (busy, never evicted) until the
    response is fully sent: for a full response until :meth:`create` returns, for a stream until
    its last event or the client's disconnect.

    Errors raised by the engine before the first output (queue full, prompt too long) become
    HTTP errors; a stream starts as soon as one job produced its first output. If the client
    disconnects, the jobs are aborted (freeing their KV blocks) and nothing is sent.

    Args:
        request: the HTTP request.
        body: the parsed request body.
    """

    #: The result cache's route name (None: never cached).
    cache_route: str | None = None
    #: Prefix of the response id (``cmpl``, ``chatcmpl``): ``<prefix>-<32 hex>``.
    id_prefix = "cmpl"
    #: The stream's last event (None: none; the Responses API ends with its own event).
    done_event: str | None = DONE

    def __init__(self, request: Request, body: Any) -> None:
        self.request = request
        self.body = body
        self.response_id = new_id(self.id_prefix)
        self.created = now()
        #: The model's name as the response reports it (set by :meth:`prepare`).
        self.model = ""
        self._ticket: Ticket | None = None
        self._settled = False
        self._run: GenerationRun | None = None
        self._jobs: list[Job] = []
        self._served: ServedModel | None = None

    @abstractmethod
    def check(self) -> None:
        """Refuse what the endpoint cannot honour, before any model is touched.

        Raises:
            APIError: 400 naming the field.
        """

    @abstractmethod
    async def prepare(self, stack: AsyncExitStack) -> tuple[ServedModel, list[Job]]:
        """Acquire the model on ``stack`` and build the engine jobs (one per choice).

        Raises:
            APIError: 400 naming the field (prompts, tools, grammar, context length); the
                provider's 404/503.
        """

    @abstractmethod
    def full_response(self, results: list[ChoiceResult], usage: Usage) -> BaseModel:
        """The whole response body from every choice's finished output."""

    @abstractmethod
    def stream_events(self, run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
        """The stream's events while the jobs run (without :attr:`done_event`); updates ``usage``."""

    def stream_options(self) -> tuple[bool, bool]:
        """``stream_options``' (``include_usage``, ``continuous_usage_stats``) of the request."""
        options = getattr(self.body, "stream_options", None)
        return bool(options and options.include_usage), bool(options and options.continuous)

    async def create(self) -> FullResult | StreamResult:
        """Answer the request, as a full JSON body or as a stream (``body.stream``).

        Raises:
            APIError: the request's errors (400 naming the field, 404, 429 with ``retry_after``,
                503); engine errors before the first output (``QueueFullError``,
                ``PromptTooLongError``, ``EngineDeadError``).
            ClientDisconnected: the client left before the response started (answered 499).
        """
        self.check()
        async with AsyncExitStack() as stack:
            served, jobs = await self.prepare(stack)
            self._served, self._jobs = served, jobs
            cache_key = (result_cache_key(self.request, self.cache_route, self.body, served)
                         if self.cache_route is not None else None)
            if cache_key is not None:  # an identical earlier request's stored answer (:mod:`.result_cache`)
                hit = self.request.app.state.result_cache.get(cache_key, served.name)
                if hit is not None and self.body.stream:
                    include_usage, continuous = self.stream_options()
                    return StreamResult(replay(hit, include_usage, continuous), headers={RESULT_CACHE_HEADER: "hit"})
                if hit is not None:
                    return FullResult(hit, {RESULT_CACHE_HEADER: "hit"})
            with request_trace.phase(self.request.scope, "admission"):
                self._ticket = await admit(self.request, served, jobs)
            run = self._run = GenerationRun(served.engine, jobs, on_job_end=self._job_ended)
            usage = UsageCounter(jobs)
            request_log.note_usage(self.request.scope, usage)
            run.start()
            self.request.app.state.drain.track(run)
            if not self.body.stream:
                try:
                    return await self._full(run, usage, cache_key)
                finally:
                    self._finish()
            try:
                await until_disconnect(self.request, run.wait_first())
            except BaseException:
                run.cancel()
                self._finish()
                raise
            request_log.note(self.request.scope, first_output=True)
            owned = stack.pop_all()

            async def on_close() -> None:
                run.cancel()
                self._finish()
                await owned.aclose()

            return StreamResult(self._events(run, usage), on_close,
                                stall_timeout=self.request.app.state.settings.timeout_stalled_response)

    async def _full(self, run: GenerationRun, usage: UsageCounter, cache_key: str | None) -> FullResult:
        """Collect every output, build the body with :meth:`full_response`, store it when cacheable."""

        async def collect() -> BaseModel:
            results = [ChoiceResult() for _ in self._jobs]
            await run.wait_first()
            request_log.note(self.request.scope, first_output=True)
            async for job, out in run.outputs():
                results[job.index].add(out)
                usage.update(job, out)
            return self.full_response(results, usage.usage())

        try:
            body = await until_disconnect(self.request, collect())
        except BaseException:
            run.cancel()
            raise
        data = body.model_dump(mode="json")
        if cache_key is None:
            return FullResult(data)
        if all(c.get("finish_reason") in ("stop", "length", "tool_calls") for c in data.get("choices", [])):
            self.request.app.state.result_cache.put(cache_key, data)
        return FullResult(data, {RESULT_CACHE_HEADER: "miss"})

    async def _events(self, run: GenerationRun, usage: UsageCounter) -> AsyncIterator[str]:
        """:meth:`stream_events`, then :attr:`done_event`; an engine failure mid-stream becomes an error event."""
        try:
            async for event in self.stream_events(run, usage):
                yield event
        except Exception as exc:  # an engine failure mid-stream: the status line is already sent
            err = to_api_error(exc)
            yield sse_event(error_body(err.status, err.message, param=err.param, code=err.code))
        if self.done_event is not None:
            yield self.done_event

    def _job_ended(self, last: bool) -> None:
        """The engine is done with one job: its admission room is free at once, even while the
        client is still reading (or not reading) the response, so an unread stream holds nothing."""
        if self._ticket is not None:
            self._ticket.release(1)
        if last:
            self._settle()

    def _settle(self) -> None:
        """Release the admission room, charge the completion tokens and write the engine phases' spans (once)."""
        if self._settled or self._run is None or self._served is None:
            return
        self._settled = True
        if self._ticket is not None:
            self._ticket.release()
        tenant = identity_of(self.request.scope).tenant
        self.request.app.state.admission.charge(tenant, self._run.completion_tokens, "generation")
        request_trace.engine_spans(self.request.scope, self._served.name, self._jobs, self._run.last_outputs)

    def _finish(self) -> None:
        """The response is over (sent, failed or abandoned): stop tracking the run for the drain, and settle."""
        if self._run is not None:
            self.request.app.state.drain.untrack(self._run)
        self._settle()
