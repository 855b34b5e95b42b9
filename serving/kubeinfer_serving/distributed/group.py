"""A tensor-parallel group of ranks: the collectives the sharded model and the step protocol use.

Each group has its own rendezvous (a ``torch.distributed.TCPStore``) and its own process-group
objects, created directly (``ProcessGroupGloo`` / ``ProcessGroupNCCL``) rather than through
``init_process_group``: the serving process may hold several tensor-parallel models at once, each
with its own workers, and ``init_process_group`` allows one default group per process.

Two groups per rank, as vLLM does: a gloo group on the host for the step plans (control), and the
group for activations (data): gloo on CPU (the same group), NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: Environment variable: seconds a collective inside a step may take before it fails (default 120).
TIMEOUT_ENV = "KUBEINFER_TP_TIMEOUT_S"
#: Default of :data:`TIMEOUT_ENV`.
DEFAULT_TIMEOUT_S = 120.0
#: Seconds a worker waits for the next step plan (idle servers send none): effectively forever.
IDLE_TIMEOUT_S = 365 * 24 * 3600.0


def collective_timeout_s() -> float:
    """Seconds a collective of a step may take (``$KUBEINFER_TP_TIMEOUT_S``, default 120)."""
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one group meet: the TCPStore's host and port (rank 0 hosts it)."""

    host: str
    port: int


class TPGroup:
    """One rank's view of a tensor-parallel group.

    Build it with :meth:`create` (rank 0 also hosts the store, see :meth:`host_store`).

    Attributes:
        rank, size: this rank and the group size.
        device: the torch device this rank computes on.
        store: the rendezvous store (also carries worker error messages, key ``error/RANK``).
    """

    def __init__(self, rank: int, size: int, device: torch.device, store: dist.Store, timeout_s: float) -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self.store = store
        timeout = datetime.timedelta(seconds=timeout_s)
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, timeout)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, opts)
        else:
            self.data = self.control

    @staticmethod
    def host_store(size: int, timeout_s: float) -> tuple[dist.TCPStore, Rendezvous]:
        """Rank 0: start the group's TCPStore on a free loopback port.

        Returns:
            (the store, the :class:`Rendezvous` the workers connect to).
        """
        store = dist.TCPStore("127.0.0.1", 0, size, True, datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        return store, Rendezvous("127.0.0.1", store.port)

    @staticmethod
    def connect_store(rdv: Rendezvous, size: int, timeout_s: float) -> dist.TCPStore:
        """A worker: connect to rank 0's store."""
        return dist.TCPStore(rdv.host, rdv.port, size, False, datetime.timedelta(seconds=timeout_s))

    # ------------------------------------------------------------------ data collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (the row-parallel layers' reduction); returns ``x``."""
        self.data.allreduce([x]).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets the ranks' ``x`` ([N, n] each) concatenated along the last dim -> [N, size * n];
        other ranks send theirs and get None (the vocabulary-parallel LM head's logits)."""
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            self.data.gather([parts], [x], opts).wait()
            return torch.cat(parts, dim=-1)
        self.data.gather([], [x], opts).wait()
        return None

    # ------------------------------------------------------------------ control (host tensors)
    def broadcast_host(self, t: torch.Tensor, timeout_s: float | None = None) -> torch.Tensor:
        """Broadcast a CPU tensor from rank 0 over the control group, in place.

        ``timeout_s``: this call's limit (workers waiting for the next plan pass :data:`IDLE_TIMEOUT_S`).
        """
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if timeout_s is not None:
            opts.timeout = datetime.timedelta(seconds=timeout_s)
        self.control.broadcast([t], opts).wait()
        return t

    def gather_host(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Rank 0 gets every rank's CPU tensor ``t`` (same shape everywhere) over the control group."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank == 0:
            parts = [torch.empty_like(t) for _ in range(self.size)]
            self.control.gather([parts], [t], opts).wait()
            return parts
        self.control.gather([], [t], opts).wait()
        return None
