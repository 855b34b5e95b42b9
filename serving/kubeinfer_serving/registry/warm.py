"""The warm tier: weights of evicted models kept in host memory, bounded in bytes, LRU.

Reloading a model from here skips reading the files and deserialising the safetensors; on
CUDA it is one host-to-device copy of pinned memory (the idea of vLLM's "sleep mode" level 1,
which offloads weights to CPU memory). On CPU the snapshot holds the weight tensors themselves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class HostSnapshot:
    """What a loaded model leaves behind in host memory when it is evicted.

    Attributes:
        payload: loader-specific (e.g. Hugging Face-named weight tensors + config + tokenizer).
        nbytes: host bytes the payload holds.
    """

    payload: Any
    nbytes: int


class WarmTier:
    """Snapshots by model name, least recently stored dropped first when over ``capacity_bytes``.

    Args:
        capacity_bytes: most host bytes held; 0 disables the tier (nothing is kept).
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[str, HostSnapshot] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Host bytes held now."""
        return sum(s.nbytes for s in self._items.values())

    def names(self) -> list[str]:
        """Models held, oldest first."""
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def accepts(self, nbytes: int) -> bool:
        """Whether a snapshot of ``nbytes`` could be kept at all (it is not larger than the tier)."""
        return 0 < nbytes <= self.capacity_bytes

    def put(self, name: str, snapshot: HostSnapshot) -> list[str]:
        """Keep ``snapshot`` (replacing one of the same name), dropping the oldest until it fits.

        Returns:
            names whose snapshots were dropped to make room (or ``[name]`` if it cannot fit at all).
        """
        self._items.pop(name, None)
        if not self.accepts(snapshot.nbytes):
            return [name]
        dropped = []
        while self._items and self.nbytes + snapshot.nbytes > self.capacity_bytes:
            old, _ = self._items.popitem(last=False)
            dropped.append(old)
        self._items[name] = snapshot
        return dropped

    def pop(self, name: str) -> HostSnapshot | None:
        """Take the snapshot of ``name`` out of the tier (None if absent)."""
        return self._items.pop(name, None)

    def clear(self) -> None:
        """Drop every snapshot."""
        self._items.clear()
