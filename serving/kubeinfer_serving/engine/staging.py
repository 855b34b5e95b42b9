"""Device-to-host copies of a step's results through pinned, double-buffered staging.

``tensor.tolist()`` on a CUDA tensor copies into pageable memory, which the driver stages
through its own pinned bounce buffer, synchronously. Here the copy goes straight into one of
two pinned host buffers with ``non_blocking=True``; the host then waits on a CUDA event
recorded right after the copy (only this copy and the work queued before it, not a device-wide
sync) and reads the buffer. Buffers alternate between calls, so a copy never overwrites the
buffer the previous step's results may still be read from. On CPU the tensor is read directly.
"""

from __future__ import annotations

import torch


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
