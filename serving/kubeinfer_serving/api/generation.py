"""Running the engine requests of one HTTP request: one per choice, concurrently, with clean aborts.

A completion with several prompts or ``n > 1`` becomes several engine requests, submitted
together so their prefill and decode share the engine's batches; the engine thread delivers
their outputs into the run's one queue. Cancelling a :class:`GenerationRun` detaches its
requests from the engine, which aborts them and frees their KV blocks at its next step. The
serving classes cancel the run when the client disconnects (streaming or not), so a client
that goes away never leaves work behind.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from kubeinfer_serving import metrics
from kubeinfer_serving.api.errors import APIError, ClientDisconnected
from kubeinfer_serving.api.prompts import tokenizer_lock
from kubeinfer_serving.api.schemas import _SamplingFields
from kubeinfer_serving.engine.outputs import RequestOutput
from kubeinfer_serving.engine.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token id as a string -> bias in [-100, 100]) with integer keys.

    Raises:
        APIError: 400 ``param=logit_bias`` for a key that is not a token id or a value out of range.
    """
    out: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias",
                           code="invalid_value") from None
        if not -100.0 <= value <= 100.0:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value!r}", param="logit_bias",
                           code="invalid_value")
        out[tok] = float(value)
    return out


def check_fanout(request: Request, num_prompts: int, n: int) -> None:
    """Refuse a request that would become more engine requests than ``--max-jobs-per-request``.

    Checked before any tokenization, so a request of 5,000 prompts x ``n`` 16 costs nothing.

    Raises:
        APIError: 400 naming ``prompt`` (or ``n`` for a single prompt) when ``num_prompts * n``
            exceeds the cap.
    """
    cap = request.app.state.settings.max_jobs_per_request
    if num_prompts * n > cap:
        raise APIError(400, f"This request asks for {num_prompts * n} completions ({num_prompts} prompts x n={n}); "
                       f"at most {cap} are allowed per request", param="prompt" if num_prompts > 1 else "n",
                       code="invalid_value")


def bad_words_token_ids(tokenizer: Any, words: list[str] | None) -> list[list[int]]:
    """vLLM's ``bad_words``: each word's token ids, as written and with a leading space.

    A word is banned in both spellings since BPE tokenizers encode a word differently at the
    start of the text and after a space (vLLM tokenizes both forms too). Blocking (it holds the
    tokenizer's lock): routes call it in a worker thread.
    """
    out: list[list[int]] = []
    with tokenizer_lock(tokenizer):
        for word in words or []:
            for text in (word, " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
    return out


def sampling_params(body: _SamplingFields, max_tokens: int, choice: int, priority: int = 0,
                    cache_salt: str | None = None, *, bad_words_ids: list[list[int]] | None = None,
                    logprobs: int | None = None, prompt_logprobs: int | None = None,
                    guide: Any = None) -> SamplingParams:
    """Engine sampling parameters for choice ``choice`` (0-based) of ``body``, with the resolved
    ``priority`` and prefix-cache salt.

    OpenAI defaults: temperature 1, top_p 1. With a ``seed`` and ``n > 1``, choice ``j`` uses
    ``seed + j`` so the choices differ yet the whole response stays reproducible.

    Args:
        priority: the request's scheduling priority (already resolved from the tenant's default).
        cache_salt: the prefix-cache salt (already combined with the tenant's), or None.
        bad_words_ids: ``bad_words`` as token ids (:func:`bad_words_token_ids`).
        logprobs, prompt_logprobs: how many top alternatives to report per output / prompt
            token (None: no log-probabilities).
        guide: the compiled grammar of a structured-output request.

    Raises:
        APIError: 400 naming the field when a value is out of range.
    """
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            seed=None if body.seed is None else body.seed + choice,
            stop=[s for s in stop if s],
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            priority=priority,
            cache_salt=cache_salt,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            min_tokens=body.min_tokens,
            min_p=body.min_p or 0.0,
            logit_bias=_logit_bias(body.logit_bias),
            allowed_token_ids=body.allowed_token_ids,
            bad_words_token_ids=bad_words_ids or [],
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            guide=guide,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as exc:
        message = str(exc)
        param = message.split(" ", 1)[0]
        raise APIError(400, message, param=param if param in type(body).model_fields else None,
                       code="invalid_value") from exc


@dataclass
class Job:
    """One engine request of an HTTP request.

    Attributes:
        index: the choice index in the response.
        prompt_index: which prompt of the request it continues.
        request_id: the engine's request id (unique per process).
        prompt_token_ids: the prompt, token ids.
        params: its sampling parameters.
    """

    index: int
    prompt_index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class GenerationRun:
    """The engine requests of one HTTP request, run concurrently and merged into one output stream.

    Every job is submitted with :meth:`AsyncLLMEngine.add_request
    <kubeinfer_serving.engine.async_engine.AsyncLLMEngine.add_request>` and a sink of this run:
    the engine thread hands each output to the event loop once, straight into this run's one
    queue (no queue per job, no task per job).

    Usage: ``run.start()``, then ``await run.wait_first()`` (raises the engine's admission errors:
    ``QueueFullError``, ``PromptTooLongError``, ``EngineDeadError``), then ``async for job, out in
    run.outputs()``; ``run.cancel()`` aborts whatever still runs and is safe to call at any time.

    Args:
        engine: the model's engine (``add_request`` / ``detach``).
        jobs: the engine requests, choice indexes 0..len(jobs)-1.
        on_job_end: called once per job when the engine is done with it (finished, failed or
            aborted), with True for the last one; the consumer may still be reading the job's outputs.
    """

    def __init__(self, engine: Any, jobs: list[Job], on_job_end: Callable[[bool], None] | None = None) -> None:
        self._engine = engine
        self._jobs = {j.index: j for j in jobs}
        self._queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._finished: set[int] = set()
        self._ended: set[int] = set()
        self._output_tokens: dict[int, int] = {}
        self._model = getattr(engine, "model_name", "unknown")
        #: choice index -> the job's last output (``finished``, with the engine's ``timings``), once it ended.
        self.last_outputs: dict[int, RequestOutput] = {}
        self.on_job_end = on_job_end

    @property
    def completion_tokens(self) -> int:
        """Output tokens the engine produced so far, over all jobs (whether the consumer read them or not)."""
        return sum(self._output_tokens.values())

    def start(self) -> None:
        """Submit every job to the engine. A job the engine refuses at once (queue full, engine
        stopped) ends the run: its error comes out of :meth:`wait_first` and later jobs are not sent."""
        for job in self._jobs.values():
            try:
                self._engine.add_request(job.request_id, job.prompt_token_ids, job.params,
                                         functools.partial(self._deliver, job.index))
            except Exception as exc:  # noqa: BLE001 - the consumer gets it from wait_first
                self._deliver(job.index, exc)
                self.cancel()
                return

    def _deliver(self, index: int, item: RequestOutput | BaseException) -> None:
        """The sink of job ``index`` (on the event loop): queue the output or the error for the consumer."""
        if index in self._ended:
            return
        if isinstance(item, BaseException):
            if type(item) is ValueError:  # the engine's verdict on the request itself (e.g. an unknown adapter)
                item = APIError(400, str(item), param="prompt")
            self._queue.put_nowait((index, None, item))
            self._end(index, detach=False)
            return
        self._output_tokens[index] = item.num_output_tokens
        if item.finished:
            self.last_outputs[index] = item
            metrics.record_finished_request(self._model, item)
        self._queue.put_nowait((index, item, None))
        if item.finished:
            self._end(index, detach=False)

    def _end(self, index: int, *, detach: bool = True) -> None:
        """The engine is done with job ``index``. ``detach``: stop its delivery, aborting it if it
        still runs (not needed after its last output or error, which end the delivery; a job never
        submitted is unknown to the engine, and detaching it does nothing)."""
        self._ended.add(index)
        if detach:
            self._engine.detach(self._jobs[index].request_id)
        if self.on_job_end is not None:
            self.on_job_end(len(self._ended) == len(self._jobs))

    async def _next(self) -> tuple[int, RequestOutput]:
        index, out, exc = await self._queue.get()
        if exc is not None:
            self.cancel()
            raise exc
        assert out is not None
        if out.finished:
            self._finished.add(index)
        return index, out

    async def wait_first(self) -> None:
        """Wait until some job has produced its first output (its prompt was admitted and prefilled).

        Not every job: with more choices than batch slots the others wait in the engine's queue,
        and a stream must not hold back the choices that already have tokens. The engine refuses
        a job (queue full, prompt too long) when it is submitted, before any step produces output,
        so such errors still come here rather than in the middle of a stream.

        Raises:
            QueueFullError, PromptTooLongError, EngineDeadError: a job's admission error; the
                other jobs are aborted.
        """
        if not self._buffer:
            self._buffer.append(await self._next())

    async def outputs(self) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Every output of every job in arrival order, until all jobs finished.

        Raises:
            EngineDeadError (or another engine error): when a job fails mid-way; the rest are aborted.
        """
        while self._buffer:
            index, out = self._buffer.pop(0)
            yield self._jobs[index], out
        while len(self._finished) < len(self._jobs):
            index, out = await self._next()
            yield self._jobs[index], out

    def interrupt(self, exc: BaseException) -> None:
        """End the run with ``exc``: the consumer's next wait raises it, and every job is aborted."""
        self._queue.put_nowait((-1, None, exc))

    def cancel(self) -> None:
        """Abort every job still running (the engine frees their KV blocks at its next step)."""
        for index in list(self._jobs):
            if index not in self._ended:
                self._end(index)


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the ASGI ``http.disconnect`` message).

    Called after the body was read, ``receive()`` blocks until the disconnect (uvicorn semantics).
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first.

    Raises:
        ClientDisconnected: the client went away first; ``awaitable`` was cancelled.
    """
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        task.cancel()
        watcher.cancel()
