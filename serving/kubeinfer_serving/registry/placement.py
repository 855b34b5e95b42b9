"""Where a model goes in a pod with several devices, and which idle models leave to make room.

The pod's devices each have a byte budget (:func:`~.memory.device_budgets`). A model spans
``ranks`` devices: 1 for a single-device model, its tensor parallel size for a split one. It
charges each device of its span ``ceil(total / ranks)`` bytes (the ranks of a split model hold
equal shards and KV pools of equal size).

**Placement** (chosen here; vLLM and the other peers run one model per engine, so there is no
prior art to follow):

* A split model of N ranks takes N *contiguous* devices ``k .. k+N-1`` (rank r on device k+r);
  a single-device model is a window of one.
* If some windows fit now, the one with the most free bytes on its fullest device wins (ties: the
  lowest first device): single-device models spread over the GPUs, and a split model lands where
  it leaves the most room.
* Else, for every window, the least recently used idle models are evicted in LRU order, but only
  those holding bytes on the window's devices (evicting others frees nothing it needs) or, when
  ``maxLoadedModels`` is the limit, any of them. The window that evicts the fewest models wins,
  then the one whose victims were all used longest ago (LRU across windows), then the fewest
  bytes, then the lowest first device.

Everything here is pure: the registry passes what each resident model holds and applies the plan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    """A model that holds (or is releasing) device memory.

    Attributes:
        key: the registry's handle for it (returned in :attr:`Placement.victims`).
        devices: device indexes it spans.
        per_device: bytes it charges each of them.
        last_used: monotonic time of its last use (the LRU order).
        evictable: loaded, idle, not preloaded, not already leaving.
        leaving: being evicted or unloaded now (its bytes free up once that completes).
        slot: counts towards ``maxLoadedModels``.
    """

    key: object
    devices: tuple[int, ...]
    per_device: int
    last_used: float = 0.0
    evictable: bool = False
    leaving: bool = False
    slot: bool = True


@dataclass(frozen=True)
class Placement:
    """Where a model goes: ``devices`` (indexes, contiguous) and the idle models to evict first (LRU order)."""

    devices: tuple[int, ...]
    victims: tuple[object, ...] = ()


def per_device_bytes(total: int, ranks: int) -> int:
    """Bytes a model of ``total`` bytes over ``ranks`` devices charges each device (rounded up)."""
    return -(-total // max(ranks, 1))


def windows(num_devices: int, ranks: int) -> list[tuple[int, ...]]:
    """Every run of ``ranks`` contiguous device indexes out of ``num_devices`` (none when too few)."""
    return [tuple(range(k, k + ranks)) for k in range(num_devices - ranks + 1)]


def capacity(budgets: list[int], ranks: int) -> int:
    """The most bytes a model over ``ranks`` devices can ever reserve: ranks x the smallest budget
    of the best window (0 when the pod has fewer devices than ranks)."""
    return max((ranks * min(budgets[d] for d in w) for w in windows(len(budgets), ranks)), default=0)


def _usage(budgets: list[int], holders: list[Holder]) -> list[int]:
    used = [0] * len(budgets)
    for h in holders:
        for d in h.devices:
            used[d] += h.per_device
    return used


def _fits(window: tuple[int, ...], need: int, budgets: list[int], used: list[int], free_slots: int | None) -> bool:
    return all(used[d] + need <= budgets[d] for d in window) and (free_slots is None or free_slots >= 1)


def _headroom(window: tuple[int, ...], budgets: list[int], used: list[int]) -> int:
    return min(budgets[d] - used[d] for d in window)


def place(need: int, ranks: int, budgets: list[int], holders: list[Holder],
          max_models: int | None = None) -> Placement | None:
    """Choose the devices of a model that charges ``need`` bytes on each of ``ranks`` devices.

    Args:
        need: bytes per device (:func:`per_device_bytes`).
        ranks: devices the model spans (1 <= ranks <= len(budgets)).
        budgets: bytes allowed on each device of the pod.
        holders: every other model holding memory (loaded, loading, leaving).
        max_models: the pod's ``maxLoadedModels`` (None: no limit).

    Returns:
        The placement (see the module docstring), with victims to evict first; a placement with no
        victims while some holders are leaving means "wait for them, then place again". None: it
        cannot fit even after evicting every evictable model (wait for one to become idle).
    """
    used = _usage(budgets, holders)
    free_slots = None if max_models is None else max_models - sum(1 for h in holders if h.slot)
    cands = windows(len(budgets), ranks)
    fitting = [w for w in cands if _fits(w, need, budgets, used, free_slots)]
    if fitting:
        return Placement(max(fitting, key=lambda w: (_headroom(w, budgets, used), -w[0])))
    staying = [h for h in holders if not h.leaving]
    lru = sorted((h for h in staying if h.evictable), key=lambda h: h.last_used)
    best: tuple[tuple, Placement] | None = None
    for w in cands:
        u = _usage(budgets, staying)
        slots = None if max_models is None else max_models - sum(1 for h in staying if h.slot)
        victims: list[Holder] = []
        for h in lru:
            if _fits(w, need, budgets, u, slots):
                break
            short_bytes = any(u[d] + need > budgets[d] for d in w)
            if (short_bytes and set(h.devices) & set(w)) or (slots is not None and slots < 1):
                victims.append(h)
                for d in h.devices:
                    u[d] -= h.per_device
                if slots is not None and h.slot:
                    slots += 1
        if not _fits(w, need, budgets, u, slots):
            continue
        newest = max((h.last_used for h in victims), default=float("-inf"))
        rank = (len(victims), newest, sum(h.per_device * len(h.devices) for h in victims), w[0])
        if best is None or rank < best[0]:
            best = (rank, Placement(w, tuple(h.key for h in victims)))
    return best[1] if best is not None else None
