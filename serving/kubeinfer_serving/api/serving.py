"""What completions and chat completions share: acquiring the model, running the jobs, usage, ids.

The model acquired from the provider is held (busy, never evicted) until the response is fully
sent: for a non-streaming request until the handler returns, for a stream until its last event
or the client's disconnect (:class:`~kubeinfer_serving.api.sse.SSEResponse` releases it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
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
from kubeinfer_serving.api.errors import CLIENT_CLOSED, APIError, error_body, to_api_error
from kubeinfer_serving.api.generation import ClientDisconnected, GenerationRun, Job, until_disconnect
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


def engine_config(served: ServedModel) -> Any:
    """The :class:`~kubeinfer_serving.engine.config.EngineConfig` of ``served``'s engine, or None."""
    return getattr(getattr(served.engine, "engine", None), "config", None)


def resolve_priority(request: Request, body: Any, served: ServedModel) -> int:
    """The request's scheduling priority: its ``priority`` field, else its tenant's default.

    Under the ``fcfs`` policy every request has priority 0 (as in vLLM, a non-zero ``priority``
    is then an error). With API keys on, a tenant may not ask for a priority below its floor
    (``minPriority`` in the keys file, default its own ``priority``), so no tenant can jump the
    others' queues; without keys (one anonymous tenant) any value is allowed.

    Raises:
        APIError: 400 ``unsupported_parameter`` for a non-zero ``priority`` on an ``fcfs`` model;
            400 ``invalid_value`` for a priority below the tenant's floor.
    """
    config = engine_config(served)
    policy = getattr(config, "scheduling_policy", "fcfs")
    if body.priority is not None:
        if body.priority != 0 and policy != "priority":
            raise APIError(400, f"priority needs the priority scheduling policy; model {served.name!r} schedules "
                           "first come, first served", param="priority", code="unsupported_parameter")
        tenant = identity_of(request.scope).tenant
        if policy == "priority" and request.app.state.keys.enabled and body.priority < tenant.priority_floor:
            raise APIError(400, f"priority must be at least {tenant.priority_floor} for tenant {tenant.name!r} "
                           "(lower values run first; the tenant's minPriority)", param="priority",
                           code="invalid_value")
        return body.priority
    return identity_of(request.scope).tenant.priority if policy == "priority" else 0


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
    config = engine_config(served)
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


async def respond(
    request: Request,
    stack: AsyncExitStack,
    served: ServedModel,
    jobs: list[Job],
    *,
    stream: bool,
    build_response: Callable[[list[ChoiceResult], Usage], BaseModel],
    stream_events: Callable[[GenerationRun, UsageCounter], AsyncIterator[str]],
    cache_key: str | None = None,
    include_usage: bool = False,
    continuous_usage: bool = False,
    done_event: str | None = DONE,
) -> Response:
    """Run ``jobs`` on ``served.engine`` and answer as one JSON body or as an SSE stream.

    Errors raised by the engine before the first output (queue full, prompt too long) become
    HTTP errors; the stream starts as soon as one job produced its first output (each choice
    streams as soon as it has tokens). If the client
    disconnects, the jobs are aborted (freeing their KV blocks) and nothing is sent.

    Args:
        build_response: (results per choice index, usage) -> the response body.
        stream_events: (run, usage counter) -> the SSE ``data:`` events, without the final ``[DONE]``.

        cache_key: the result-cache key (:mod:`.result_cache`) when the request may be cached.
        include_usage: the stream's ``stream_options.include_usage`` (for a replayed hit).
        continuous_usage: the stream's ``stream_options.continuous_usage_stats`` (for a replayed hit).
        done_event: the stream's last event (None: none; the Responses API ends with its own event).

    Returns:
        a JSONResponse, an SSEResponse (which now owns ``stack``), or an empty 499 response.
    """
    cache: ResultCache = request.app.state.result_cache
    if cache_key is not None:
        hit = cache.get(cache_key, served.name)
        if hit is not None:
            if stream:
                return StreamingResponse(replay(hit, include_usage, continuous_usage), media_type="text/event-stream",
                                         headers={RESULT_CACHE_HEADER: "hit", "Cache-Control": "no-cache"})
            return JSONResponse(hit, headers={RESULT_CACHE_HEADER: "hit"})
    try:
        with request_trace.phase(request.scope, "admission"):
            ticket = await admit(request, served, jobs)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    run = GenerationRun(served.engine, jobs)
    usage = UsageCounter(jobs)
    request_log.note_usage(request.scope, usage)
    drain = request.app.state.drain
    admission: FairAdmission = request.app.state.admission
    tenant = identity_of(request.scope).tenant
    settled = False

    def settle() -> None:
        """Release the admission room, charge the completion tokens and write the engine phases' spans (once)."""
        nonlocal settled
        if not settled:
            settled = True
            if ticket is not None:
                ticket.release()
            admission.charge(tenant, run.completion_tokens, "generation")
            request_trace.engine_spans(request.scope, served.name, jobs, run.last_outputs)

    def job_ended(last: bool) -> None:
        """The engine is done with one job: its admission room is free at once, even while the
        client is still reading (or not reading) the response, so an unread stream holds nothing."""
        if ticket is not None:
            ticket.release(1)
        if last:
            settle()

    def finish() -> None:
        """The response is over (sent, failed or abandoned): stop tracking the run for the drain, and settle."""
        drain.untrack(run)
        settle()

    run.on_job_end = job_ended
    run.start()
    drain.track(run)
    try:
        if not stream:

            async def collect() -> BaseModel:
                results = [ChoiceResult() for _ in jobs]
                await run.wait_first()
                request_log.note(request.scope, first_output=True)
                async for job, out in run.outputs():
                    results[job.index].add(out)
                    usage.update(job, out)
                return build_response(results, usage.usage())

            try:
                body = await until_disconnect(request, collect())
            finally:
                finish()
            data = body.model_dump(mode="json")
            if cache_key is None:
                return JSONResponse(data)
            if all(c.get("finish_reason") in ("stop", "length", "tool_calls") for c in data.get("choices", [])):
                cache.put(cache_key, data)
            return JSONResponse(data, headers={RESULT_CACHE_HEADER: "miss"})
        await until_disconnect(request, run.wait_first())
        request_log.note(request.scope, first_output=True)
    except ClientDisconnected:
        run.cancel()
        finish()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        run.cancel()
        finish()
        raise

    async def events() -> AsyncIterator[str]:
        try:
            async for event in stream_events(run, usage):
                yield event
        except Exception as exc:  # an engine failure mid-stream: the status line is already sent
            err = to_api_error(exc)
            yield sse_event(error_body(err.status, err.message, param=err.param, code=err.code))
        if done_event is not None:
            yield done_event

    owned = stack.pop_all()

    async def on_close() -> None:
        run.cancel()
        finish()
        await owned.aclose()

    return SSEResponse(events(), on_close, stall_timeout=request.app.state.settings.timeout_stalled_response)

