"""Which adapter holds which device slot: the engine's LoRA bookkeeping and the scheduler's gate.

An adapter in a slot is *pinned* while running sequences use it (a reference count). A
sequence with an adapter is admitted only once its adapter is in a slot: already there, or
written into a free slot, or into the least recently used slot whose adapter no running
sequence uses (that adapter is evicted from the device; its host copy stays). When every slot
is pinned by other adapters the sequence keeps waiting and the scheduler looks at the next one
(vLLM's behaviour at ``max_loras``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from .adapter import AdapterLoadError, LoRAAdapter
from .slots import LoRASlots


class _HasLoRA(Protocol):
    lora: LoRAAdapter | None


class LoRAManager:
    """The engine's adapters (by name) and their slots.

    Args:
        slots: the device pool.

    Attributes:
        adapters: name -> adapter, the ones requests may name.
        num_loads: adapters written into a slot so far; num_evictions: adapters displaced from a slot.
    """

    def __init__(self, slots: LoRASlots) -> None:
        self.slots = slots
        self.adapters: dict[str, LoRAAdapter] = {}
        self._slot_of: dict[LoRAAdapter, int] = {}
        self._holder: list[LoRAAdapter | None] = [None] * slots.num_slots
        self._refs: dict[LoRAAdapter, int] = {}
        # Slots whose adapter no running sequence uses, least recently released first.
        self._idle: OrderedDict[int, None] = OrderedDict((i, None) for i in range(slots.num_slots))
        self.num_loads = 0
        self.num_evictions = 0

    def add(self, adapter: LoRAAdapter) -> None:
        """Make ``adapter`` available to new requests under its name.

        Raises:
            AdapterLoadError: its rank exceeds the slots' (``max_lora_rank``).
            ValueError: an adapter of that name is registered already.
        """
        if adapter.rank > self.slots.max_rank:
            raise AdapterLoadError(f"adapter {adapter.name!r}: rank {adapter.rank} exceeds maxLoraRank "
                                   f"{self.slots.max_rank}")
        if adapter.name in self.adapters:
            raise ValueError(f"adapter {adapter.name!r} is already loaded")
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> LoRAAdapter | None:
        """Stop serving new requests with adapter ``name``; requests already queued or running finish
        with it. Its slot is freed now if no running sequence uses it, else when the last one leaves.

        Returns:
            the removed adapter, or None when the name is unknown.
        """
        adapter = self.adapters.pop(name, None)
        if adapter is not None and adapter in self._slot_of and not self._refs.get(adapter):
            self._vacate(self._slot_of[adapter])
        return adapter

    def get(self, name: str) -> LoRAAdapter:
        """The adapter registered as ``name``.

        Raises:
            KeyError: unknown name.
        """
        return self.adapters[name]

    def slot_of(self, adapter: LoRAAdapter | None) -> int:
        """The slot ``adapter`` is in, -1 for None (the base model).

        Raises:
            KeyError: it is in no slot (a sequence is only scheduled after :meth:`acquire`).
        """
        return -1 if adapter is None else self._slot_of[adapter]

    def resident(self) -> list[str]:
        """Names of the adapters now in a slot."""
        return [a.name for a in self._holder if a is not None]

    def running_counts(self) -> dict[str, int]:
        """Adapter name -> running sequences using it (only adapters with some)."""
        return {a.name: n for a, n in self._refs.items() if n}

    def acquire(self, seq: _HasLoRA) -> bool:
        """Pin ``seq``'s adapter in a slot for a sequence entering the running batch.

        Returns:
            True (pinned, or no adapter), False when every slot is pinned by other adapters.
        """
        adapter = seq.lora
        if adapter is None:
            return True
        slot = self._slot_of.get(adapter)
        if slot is None:
            if not self._idle:
                return False
            slot = next(iter(self._idle))
            if self._holder[slot] is not None:
                self.num_evictions += 1
                self._vacate(slot)
            self.slots.write(slot, adapter)
            self._holder[slot] = adapter
            self._slot_of[adapter] = slot
            self.num_loads += 1
        self._idle.pop(slot, None)
        self._refs[adapter] = self._refs.get(adapter, 0) + 1
        return True

    def release(self, seq: _HasLoRA) -> None:
        """Unpin ``seq``'s adapter (the sequence left the running batch: finished or preempted)."""
        adapter = seq.lora
        if adapter is None:
            return
        n = self._refs[adapter] - 1
        if n:
            self._refs[adapter] = n
            return
        del self._refs[adapter]
        slot = self._slot_of[adapter]
        if self.adapters.get(adapter.name) is not adapter:
            self._vacate(slot)  # removed while it ran
            return
        self._idle[slot] = None
        self._idle.move_to_end(slot)

    def _vacate(self, slot: int) -> None:
        adapter = self._holder[slot]
        if adapter is not None:
            del self._slot_of[adapter]
        self._holder[slot] = None
        self._idle[slot] = None
        self._idle.move_to_end(slot, last=False)  # empty slots are taken first
