"""How many bytes the registry may fill with weights and KV pools, and what the device holds."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kubeinfer_serving.config import fallback

#: Fraction of device memory used when the catalogue names no budget (vLLM's gpu_memory_utilization default).
DEFAULT_MEMORY_FRACTION: float = fallback("gpu_memory_utilization")


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` in bytes.

    CUDA: the device's total memory. CPU: physical RAM, or the cgroup v2 ``memory.max`` limit
    of the container when that is smaller.
    """
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total)


def resolve_budget(memory_budget_bytes: int | None, fraction: float | None, device: torch.device) -> int:
    """The registry's byte budget: ``memory_budget_bytes`` if set, else ``fraction`` (default 0.9) of the device."""
    if memory_budget_bytes is not None:
        return int(memory_budget_bytes)
    return int(device_memory_bytes(device) * (fraction if fraction is not None else DEFAULT_MEMORY_FRACTION))



def pod_devices(device: torch.device, devices: list[torch.device | str] | None = None) -> list[torch.device]:
    """The devices the registry places models on, in index order.

    ``devices`` when given (tests inject several CPU "slots" this way, e.g. ``["cpu"] * 4``); else
    every visible GPU when ``device`` is CUDA without an index (the pod's GPUs), else ``[device]``.
    """
    if devices:
        return [torch.device(d) for d in devices]
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(max(torch.cuda.device_count(), 1))]
    return [device]


def device_budgets(memory_budget_bytes: int | None, fraction: float | None,
                   devices: list[torch.device]) -> list[int]:
    """The byte budget of each device (see :func:`resolve_budget` for one device).

    A GPU has its own memory: each gets ``memory_budget_bytes``, else ``fraction`` x its memory.
    CPU slots share the host: the one host budget is split evenly between them (one slot: the
    whole budget, as with a single device).
    """
    out = []
    for d in devices:
        budget = resolve_budget(memory_budget_bytes, fraction, d)
        out.append(budget if d.type == "cuda" else budget // len(devices))
    return out
