"""Runs an :class:`LLMEngine` on its own thread and streams outputs into asyncio.

The model runs in a dedicated thread so the HTTP event loop never waits for a step (torch
releases the GIL inside its kernels). Requests and aborts travel to the thread through a
thread-safe inbox, drained at the start of every step, so a request joins the running batch
at the next step; outputs travel back through ``loop.call_soon_threadsafe`` to one sink per
request, called on the requester's event loop (the API's run puts them straight into its one
queue per HTTP request; :meth:`AsyncLLMEngine.generate` into a queue of its own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .config import EngineConfig, EngineStats
from .errors import EngineDeadError, RequestFailedError
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling import SamplingParams
from .validation import RequestValidator

log = logging.getLogger(__name__)

#: Seconds the idle loop sleeps between checks for shutdown (a new request wakes it at once).
_IDLE_WAIT = 0.5


#: Where the engine thread hands a request's outputs: called on the requester's event loop with
#: each output, the last one ``finished``, or with the exception that ended the request.
OutputSink = Callable[[RequestOutput | BaseException], None]


class _Stream:
    """Where one request's outputs go: its event loop and the requester's sink (called on that loop)."""

    __slots__ = ("loop", "sink", "prompt_len", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: OutputSink, prompt_len: int) -> None:
        self.loop = loop
        self.sink = sink
        self.prompt_len = prompt_len
        self.done = False

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException) or item.finished:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.sink, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class AsyncLLMEngine:
    """The asyncio face of one generative model's engine.

    Attributes:
        model_name: the OpenAI ``model`` name (and metric label).
        tokenizer: the Hugging Face tokenizer.
        max_model_len: context length in tokens.
        device: the torch device the model runs on.
        memory_bytes: weights + KV pool (its null block included) + decode CUDA graphs, bytes.
        engine: the wrapped :class:`LLMEngine` (touched only by the loop thread after start).
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.device = engine.device
        self.memory_bytes = engine.weights_bytes + engine.kv_cache_bytes + engine.cuda_graph_bytes
        #: The model's request rules (:class:`~kubeinfer_serving.engine.validation.RequestValidator`).
        self.validator: RequestValidator = engine.validator
        #: Unique per engine instance: a reloaded model is a new instance (result-cache keys use it).
        self.instance_id = uuid.uuid4().hex
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._num_pending_adds = 0
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.model_name}", daemon=True)
        self._thread.start()
        if engine.tp is not None:  # a tensor-parallel worker that dies fails the model at once, idle or not
            engine.tp.on_failure(self._worker_failed)

    @classmethod
    def from_model_dir(
        cls, path: str | Path, *, model_name: str, config: EngineConfig | None = None
    ) -> AsyncLLMEngine:
        """Load a Hugging Face directory, build the engine and start its thread.

        Blocking (weights load, KV pool allocation): call it off the event loop, e.g. with
        ``asyncio.to_thread``.

        Raises:
            kubeinfer_serving.models.loader.ModelLoadError / UnsupportedModelError,
            kubeinfer_serving.models.llama.WeightLoadError: see :meth:`LLMEngine.from_model_dir`.
        """
        return cls(LLMEngine.from_model_dir(path, model_name=model_name, config=config))

    # ------------------------------------------------------------------ public API
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: OutputSink,
        lora: str | None = None,
    ) -> None:
        """Queue a request whose outputs go to ``sink``, called on the calling event loop (no queue
        of the engine's own: the caller's sink is the one hand-off from the engine thread).

        ``sink`` receives each output as steps produce it, the last one with ``finished``, or
        instead the exception that ended the request (``EngineDeadError`` when the loop crashed,
        ``RequestFailedError`` when the engine failed this request, or an error of the engine's
        own validation when the loop takes the request in: :attr:`validator`'s ``PromptTooLongError``
        or ``InvalidRequestError``, or a ValueError for an unknown adapter). Delivery stops by
        itself after a finished output; call :meth:`detach` for a request no longer wanted.

        Args:
            lora: the name of a LoRA adapter of this engine to run with (None: the base model).

        Raises:
            QueueFullError: ``max_waiting_requests`` waiting already (``retry_after`` seconds).
            EngineDeadError: the engine was shut down or its loop crashed.
            ValueError: a request id in use.
        """
        if self._dead is not None or self._stopping:
            raise EngineDeadError(f"engine for {self.model_name!r} is not running")
        stream = _Stream(asyncio.get_running_loop(), sink, len(prompt_token_ids))
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            waiting = self.engine.num_waiting_beyond_batch(self._num_pending_adds)
            self.engine.validator.check_queue(waiting)
            self._streams[request_id] = stream
            self._num_pending_adds += 1
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, time.monotonic(), lora))
        self._wakeup.set()

    def detach(self, request_id: str) -> None:
        """Stop delivering ``request_id``'s outputs; abort it when its last output was not delivered yet
        (its KV blocks are freed at the next step). A no-op for an unknown request."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.done:
            self.abort(request_id)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs as steps produce them; the last one has ``finished``.

        :meth:`add_request` with an ``asyncio.Queue`` of its own as the sink, for callers that
        want one request as an async iterator. ``lora``: the name of a LoRA adapter of this
        engine to run with (None: the base model).

        Errors are raised at the first iteration, before any output:

        Raises:
            PromptTooLongError: prompt + max_tokens > max_model_len.
            QueueFullError: ``max_waiting_requests`` waiting already (``retry_after`` seconds).
            EngineDeadError: the engine was shut down or its loop crashed.
            ValueError: an empty prompt, unknown token ids, a request id in use, or an unknown adapter.

        If the consumer stops early (``aclose()``, task cancellation on client disconnect),
        the request is aborted and its KV blocks are freed at the next step.
        """
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.add_request(request_id, prompt_token_ids, params, outputs.put_nowait, lora)
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.detach(request_id)

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the loop thread between steps (the engine is not thread-safe),
        e.g. to add or remove a LoRA adapter while requests run.

        Returns:
            a ``concurrent.futures.Future`` of its result or exception (wrap it with
            ``asyncio.wrap_future`` to await it); EngineDeadError when the loop does not run.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead is not None or self._stopping:
            fut.set_exception(EngineDeadError(f"engine for {self.model_name!r} is not running"))
            return fut
        self._inbox.put(("call", fn, fut))
        self._wakeup.set()
        return fut

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when unknown or finished); its blocks are freed at the next step."""
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        """Occupancy now; ``num_waiting`` includes requests not yet taken in by the loop."""
        s = self.engine.stats()
        s.num_waiting += self._num_pending_adds
        return s

    @property
    def is_running(self) -> bool:
        """True while the loop thread serves requests."""
        return self._thread.is_alive() and not self._stopping and self._dead is None

    @property
    def dead_reason(self) -> str | None:
        """Why the loop crashed (e.g. a tensor-parallel worker died), or None while it runs or after a clean stop."""
        return None if self._dead is None else str(self._dead) or type(self._dead).__name__

    def _worker_failed(self, reason: str) -> None:
        """A tensor-parallel worker died (monitor thread): the loop crashes with ``reason`` at its next turn."""
        self._inbox.put(("fail", reason))
        self._wakeup.set()

    @property
    def is_dead(self) -> bool:
        """True once the loop thread crashed (not after a clean shutdown): the liveness probe fails."""
        return self._dead is not None

    async def shutdown(self) -> None:
        """Stop the loop: outstanding requests finish with finish_reason "abort", then the
        model and KV pool tensors are dropped (GPU memory returns to the allocator)."""
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._drain_inbox()
                if not engine.has_unfinished_requests():
                    self._wakeup.wait(_IDLE_WAIT)
                    continue
                for out in engine.step():
                    self._deliver(out)
        except BaseException as exc:  # noqa: BLE001 - any crash must reach every waiting client
            log.exception("engine loop for %s crashed", self.model_name)
            self._dead = exc
            err = EngineDeadError(f"engine for {self.model_name!r} crashed: {exc!r}")
            with self._lock:
                streams = list(self._streams.values())
            for stream in streams:
                stream.put(err)
        finally:
            self._stopping = True
            self._abort_everything()
            engine.release()

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, prompt, params, arrival, lora = msg
                with self._lock:
                    self._num_pending_adds -= 1
                    stream = self._streams.get(rid)
                if stream is None:  # the client left before the request was taken in: still an abort
                    self.engine.count_abort_before_admission(arrival)
                    continue
                try:
                    self.engine.add_request(rid, prompt, params, arrival_time=arrival, lora=lora)
                except Exception as exc:  # noqa: BLE001 - validation errors go back to the caller
                    with self._lock:
                        self._streams.pop(rid, None)
                    stream.put(exc)
            elif msg[0] == "fail":
                from kubeinfer_serving.distributed.executor import WorkerFailedError

                raise WorkerFailedError(msg[1])
            elif msg[0] == "call":
                _, fn, fut = msg
                try:
                    fut.set_result(fn(self.engine))
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    fut.set_exception(exc)
            else:
                out = self.engine.abort_request(msg[1])
                if out is not None:
                    self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        last = out.finished or out.error is not None
        with self._lock:  # a request's last output ends its delivery: the requester need not detach it
            stream = self._streams.pop(out.request_id, None) if last else self._streams.get(out.request_id)
        if stream is not None:
            stream.put(RequestFailedError(out.error) if out.error is not None else out)

    def _abort_everything(self) -> None:
        """Finish every request still in the engine or the inbox with finish_reason "abort"."""
        for rid in self.engine.request_ids():
            try:
                out = self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - after a crash the engine state may be broken
                log.exception("aborting %s failed", rid)
                continue
            if out is not None:
                self._deliver(out)
        with self._lock:
            leftover = [(rid, s) for rid, s in self._streams.items() if not s.done]
        for rid, stream in leftover:
            stream.put(RequestOutput(rid, [], "", True, "abort", stream.prompt_len, 0, 0))
        while True:  # calls queued behind the shutdown never run
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "call":
                msg[2].set_exception(EngineDeadError(f"engine for {self.model_name!r} stopped"))
