"""A step's host<->device copies through pinned, double-buffered staging.

Host to device (:class:`HostToDevice`): a step's integer inputs are packed into one of two
pinned host buffers and uploaded with one asynchronous copy. A CUDA event recorded after each
upload guards its buffer: before the buffer is packed again (two steps later) the host waits on
that event, so packing never overwrites bytes an upload has not read yet. Without the guard a
run of steps that sample nothing (prefill chunks: no device-to-host copy, so the host never
waits on the device) could let the host run two steps ahead of a queued upload.

Device to host (:class:`DeviceToHost`):

``tensor.tolist()`` on a CUDA tensor copies into pageable memory, which the driver stages
through its own pinned bounce buffer, synchronously. Here the copy goes straight into one of
two pinned host buffers with ``non_blocking=True``; the host then waits on a CUDA event
recorded right after the copy (only this copy and the work queued before it, not a device-wide
sync) and reads the buffer. Buffers alternate between calls, so a copy never overwrites the
buffer the previous step's results may still be read from. On CPU the tensor is read directly.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Fence(Protocol):
    """Marks a point in a device stream's work (a ``torch.cuda.Event``)."""

    def record(self) -> None:
        """Mark the point after the work queued so far."""

    def synchronize(self) -> None:
        """Block the host until the work queued before the latest :meth:`record` has finished."""


class AsyncCopies(Protocol):
    """Issues host-to-device copies that may run after they are issued, and fences them."""

    def copy(self, src: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Queue a copy of host ``src`` into ``out`` (or a new device tensor) and return the destination."""

    def new_fence(self) -> Fence:
        """A fence to record after copies (one per staging buffer, reused)."""


class CudaCopies:
    """:class:`AsyncCopies` on a CUDA device: ``non_blocking`` copies on the current stream, fenced
    by ``torch.cuda.Event``s (a pinned source makes the copy asynchronous to the host)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def copy(self, src: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return src.to(self.device, non_blocking=True)
        return out.copy_(src, non_blocking=True)

    def new_fence(self) -> Fence:
        return torch.cuda.Event()


class HostToDevice:
    """Pinned double-buffered host staging whose uploads are guarded by a fence per buffer.

    Use: ``buf = stage.host_buffer(n)``, pack into ``buf``, then ``stage.upload(buf[:n])``
    (or ``upload(view, out=static)`` into a fixed device buffer). :meth:`host_buffer` alternates
    between two buffers and, before handing one out, waits on the fence of the upload that last
    read it (returns at once when that upload has finished, which is almost always).

    Args:
        device: where uploads go. On CPU there is no copy: :meth:`upload` returns the host view
            (or copies into ``out``) and nothing is fenced.
        dtype: element type of the buffers.
        initial: smallest buffer, in elements (a buffer grows to twice what a step needs).
        copies: the copy engine (default :class:`CudaCopies` on CUDA, None on CPU; tests pass a
            CPU engine whose copies run late, as a CUDA stream's may).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.int64, initial: int = 4096,
                 copies: AsyncCopies | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self._initial = initial
        self._pin = device.type == "cuda"
        self._copies = copies if copies is not None else (CudaCopies(device) if device.type == "cuda" else None)
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._fences: list[Fence | None] = [None, None]
        self._in_flight = [False, False]  # an upload from the buffer was fenced and not waited on yet
        self._i = 0

    def host_buffer(self, n: int) -> torch.Tensor:
        """The next host buffer of at least ``n`` elements, once its previous upload has read it."""
        self._i ^= 1
        if self._in_flight[self._i]:
            self._fences[self._i].synchronize()  # type: ignore[union-attr]
            self._in_flight[self._i] = False
        buf = self._bufs[self._i]
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, self._initial) * 2, dtype=self.dtype, pin_memory=self._pin)
            self._bufs[self._i] = buf
        return buf

    def upload(self, view: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy ``view`` (part of the latest :meth:`host_buffer`) to the device, asynchronously, and
        fence the copy against the buffer's reuse.

        Returns:
            the device tensor (``out`` when given); on CPU ``view`` itself (or ``out`` after a copy).
        """
        if self._copies is None:  # CPU (another device: a synchronous copy, nothing left in flight)
            if out is not None:
                return out.copy_(view)
            return view if self.device.type == "cpu" else view.to(self.device)
        dst = self._copies.copy(view, out)
        fence = self._fences[self._i]
        if fence is None:
            fence = self._fences[self._i] = self._copies.new_fence()
        fence.record()
        self._in_flight[self._i] = True
        return dst


class DeviceToHost:
    """Pinned double-buffered staging for one dtype.

    Args:
        device: where the tensors to fetch live.
        dtype: their dtype (int64 for token ids, float64 for packed log-probabilities).
        initial: first buffer size in elements (grown to the next power of two when needed).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, initial: int = 1024) -> None:
        self.device = device
        self.dtype = dtype
        self._initial = initial
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._events = [None, None]
        self._i = 0

    def _buffer(self, n: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        self._i ^= 1
        buf = self._bufs[self._i]
        if buf is None or buf.numel() < n:
            size = max(self._initial, 1 << max(0, n - 1).bit_length())
            buf = torch.empty(size, dtype=self.dtype, pin_memory=True)
            self._bufs[self._i] = buf
            self._events[self._i] = torch.cuda.Event()
        return buf, self._events[self._i]

    def fetch(self, t: torch.Tensor) -> list:
        """The values of ``t`` (any shape, flattened, cast to ``dtype``) as a Python list.

        One device-to-host copy; on CUDA the host waits only for that copy (and what the
        stream queued before it).
        """
        flat = t.reshape(-1)
        if self.device.type != "cuda":
            return flat.to(self.dtype).tolist()
        n = flat.numel()
        buf, event = self._buffer(n)
        out = buf[:n]
        out.copy_(flat, non_blocking=True)
        event.record()
        event.synchronize()
        return out.tolist()
