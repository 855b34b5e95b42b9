"""Rank 0's side of a tensor-parallel model: start the workers, hand them each step, watch them.

Placement: rank r computes on ``cuda:K+r`` (the model spans N contiguous GPUs from the engine's
device ``cuda:K``, K = 0 unless the registry placed it elsewhere; rank 0 runs in
the serving process) or, on CPU, all ranks share the host. Plans go to the workers as two int64
broadcasts over gloo per step (:mod:`.protocol`); ``bench/tp_cpu.py`` measured that against
``broadcast_object_list`` (pickled objects).

Failure handling: a monitor thread waits on the worker processes; when one exits while the
model serves, the model fails with a reason naming the rank and its exit status (the async
engine ends every request with an error and reports itself dead: ``/health`` fails and the
registry shows the model Failed). A collective that fails inside a step (a dead peer closes its
sockets at once; a hung one hits ``$KUBEINFER_TP_TIMEOUT_S``) raises :class:`WorkerFailedError`
from the step. :meth:`TPExecutor.close` stops the workers (``OP_STOP``, then SIGKILL after a
grace period); workers also exit when the serving process is gone (they watch their parent pid).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.multiprocessing as mp

from .group import TPGroup
from .protocol import OP_STOP, REPORT_LEN, encode_replay, encode_step, header, init_messages
from .worker import WorkerSpec, rank_device, worker_main

log = logging.getLogger(__name__)

#: Seconds :meth:`TPExecutor.close` waits for workers to exit after ``OP_STOP`` before killing them.
STOP_GRACE_S = 10.0


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or a collective failed: the model cannot run any more."""


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is unresponsive"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


class TPExecutor:
    """The workers of one tensor-parallel model, seen from rank 0.

    Build it with :meth:`launch`, then load rank 0's shard on :attr:`group`, then :meth:`start`.

    Attributes:
        group: rank 0's :class:`~.group.TPGroup`.
        size: ranks, rank 0 included.
        failure_reason: why the model failed, or None while healthy.
        worker_bytes: (weights, KV pool) bytes of each worker, after :meth:`start`.
        worker_graph_bytes: decode CUDA graph bytes of each worker, after :meth:`start`.
        graphs_ok: every worker captured the graphs it was asked to (after :meth:`start`).
    """

    def __init__(self, group: TPGroup, procs: list, name: str) -> None:
        self.group = group
        self.size = group.size
        self.procs = procs
        self.name = name
        self.failure_reason: str | None = None
        self.worker_bytes: list[tuple[int, int]] = []
        self.worker_graph_bytes: list[int] = []
        self.graphs_ok = False
        self._closing = False
        self._on_failure: list[Callable[[str], None]] = []
        self._monitor: threading.Thread | None = None

    @classmethod
    def launch(cls, spec: WorkerSpec, size: int, name: str) -> TPExecutor:
        """Spawn ranks 1..size-1 and join the group as rank 0 (blocks until every rank connected).

        Raises:
            WorkerFailedError: a worker exited before the group formed (the reason names it).
        """
        timeout = spec.timeout_s
        store, rdv = TPGroup.host_store(size, timeout)
        ctx = mp.get_context("spawn")
        procs = []
        for rank in range(1, size):
            p = ctx.Process(target=worker_main, args=(rank, size, rdv, spec), daemon=True,
                            name=f"kubeinfer-tp-{name}-rank{rank}")
            p.start()
            procs.append(p)
        made: list = []
        joiner = threading.Thread(target=lambda: made.append(TPGroup(0, size, rank_device(spec.device_type, 0, spec.first_device),
                                                                     store, timeout)),
                                  daemon=True, name=f"tp-join-{name}")
        joiner.start()
        while joiner.is_alive():
            joiner.join(0.2)
            dead = [(r + 1, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
            if dead:
                _kill(procs)
                rank, code = dead[0]
                raise WorkerFailedError(f"tensor-parallel worker rank {rank} of {name!r} {_exit_text(code)} "
                                        "before the group formed")
        if not made:
            _kill(procs)
            raise WorkerFailedError(f"the tensor-parallel group of {name!r} did not form within {timeout:.0f}s")
        return cls(made[0], procs, name)

    def start(self, num_blocks: int, graph_sizes: list[int] | None = None, width: int = 0,
              capture: Callable[[], None] | None = None) -> None:
        """Tell the workers the KV pool size (and the decode graph buckets to capture), collect their
        reports, start the monitor.

        Args:
            num_blocks: KV pool blocks of every rank (the null block of the graphs not included).
            graph_sizes: decode CUDA graph buckets rank 0 captures (None: no graphs); the workers
                capture the same ones, in the same order, with block-table width ``width``.
            capture: rank 0's capture, run after the workers were told and before their reports
                (the captures' warm-up steps and graphs hold collectives every rank makes together).

        Raises:
            WorkerFailedError: a worker failed to load its shard (its error is in the message) or died.
        """
        try:
            for msg in init_messages(num_blocks, graph_sizes, width):
                self.group.broadcast_host(msg)
            if capture is not None:
                capture()
            parts = self.group.gather_host(torch.zeros(REPORT_LEN, dtype=torch.int64))
        except Exception as exc:
            raise self.failure(exc) from exc
        errors = [(rank, self.group.store.get(f"error/{rank}").decode()) for rank, part in enumerate(parts)
                  if rank > 0 and int(part[2])]
        if errors:
            self._closing = True
            _join_or_kill(self.procs)
            rank, msg = errors[0]
            raise WorkerFailedError(f"tensor-parallel worker rank {rank} of {self.name!r} failed to load: {msg}")
        self.worker_bytes = [(int(p[0]), int(p[1])) for p in parts[1:]]
        self.worker_graph_bytes = [int(p[4]) for p in parts[1:]]
        self.graphs_ok = bool(graph_sizes) and all(int(p[3]) for p in parts[1:])
        self._monitor = threading.Thread(target=self._watch, daemon=True, name=f"tp-monitor-{self.name}")
        self._monitor.start()

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` (on the monitor thread) when a worker dies while the model serves."""
        self._on_failure.append(callback)
        if self.failure_reason is not None and not self._closing:
            callback(self.failure_reason)

    def send_step(self, inputs, keep: bool, calls: list[np.ndarray]) -> None:
        """Broadcast a step's plan (see :mod:`.protocol`); the caller then runs the same forward.

        Raises:
            WorkerFailedError: the model already failed.
        """
        if self.failure_reason is not None:
            raise WorkerFailedError(self.failure_reason)
        h, payload = encode_step(inputs, keep, calls)
        self.group.broadcast_host(h)
        self.group.broadcast_host(payload)

    def send_replay(self, bucket: int, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                    seq_lens: np.ndarray, tables: np.ndarray, calls: list[np.ndarray]) -> None:
        """Tell the workers to replay ``bucket``'s decode graph on this step's rows (see
        :func:`~.protocol.encode_replay`); the caller then replays its own.

        Raises:
            WorkerFailedError: the model already failed.
        """
        if self.failure_reason is not None:
            raise WorkerFailedError(self.failure_reason)
        h, payload = encode_replay(bucket, ids, positions, slots, seq_lens, tables, calls)
        self.group.broadcast_host(h)
        self.group.broadcast_host(payload)

    def failure(self, exc: BaseException) -> WorkerFailedError:
        """The :class:`WorkerFailedError` for a failed collective: names the worker that exited
        (waiting up to a second for its exit status) or else the collective's error."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and all(p.exitcode is None for p in self.procs):
            time.sleep(0.05)
        dead = [(r + 1, p.exitcode) for r, p in enumerate(self.procs) if p.exitcode is not None]
        if dead:
            reason = f"tensor-parallel worker rank {dead[0][0]} of {self.name!r} {_exit_text(dead[0][1])}"
        else:
            reason = f"a tensor-parallel collective of {self.name!r} failed: {exc}"
        if self.failure_reason is None:
            self.failure_reason = reason
        return WorkerFailedError(self.failure_reason)

    def _watch(self) -> None:
        ready = multiprocessing.connection.wait([p.sentinel for p in self.procs])
        if self._closing:
            return
        for p in self.procs:
            if p.sentinel in ready:
                p.join(1.0)  # the sentinel closes a moment before the exit status can be collected
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]
        rank, code = dead[0] if dead else (1, None)
        reason = f"tensor-parallel worker rank {rank} of {self.name!r} {_exit_text(code)}"
        if self.failure_reason is None:
            self.failure_reason = reason
        log.error("%s: the model fails", self.failure_reason)
        for callback in list(self._on_failure):
            try:
                callback(self.failure_reason)
            except Exception:  # noqa: BLE001 - every callback must run
                log.exception("a tensor-parallel failure callback failed")

    def close(self) -> None:
        """Stop the workers: ``OP_STOP`` when they are healthy, then wait up to :data:`STOP_GRACE_S`
        seconds, then SIGKILL what still runs. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self.failure_reason is None:
            try:
                self.group.broadcast_host(header(OP_STOP), timeout_s=STOP_GRACE_S)
            except Exception:  # noqa: BLE001 - a broken group: the workers are killed below
                log.warning("stopping the workers of %s over the group failed", self.name, exc_info=True)
        _join_or_kill(self.procs)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (ranks 1..N-1)."""
        return [p.pid for p in self.procs]


def _join_or_kill(procs: list) -> None:
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    _kill(procs)


def _kill(procs: list) -> None:
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(5.0)
