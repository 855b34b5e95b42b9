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

