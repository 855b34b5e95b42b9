"""glibc malloc tuning on CPU: freed activation memory is reused instead of page-faulting again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PROBE = r"""
import json, resource, sys
import torch
from kubeinfer_serving.engine.host_allocator import keep_freed_host_memory

def faults_per_op():
    q = torch.randn(2048, 4, 64)
    cos, sin = torch.randn(2048, 1, 64), torch.randn(2048, 1, 64)
    def op():  # the temporaries of rotating the queries of a 2048-token chunk (RoPE)
        return q * cos + torch.cat((-q[..., 32:], q[..., :32]), dim=-1) * sin
    counts = []
    for _ in range(30):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        op()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    return sorted(counts[10:])[10]  # median of the last 20 (steady state)

# Start from glibc's static default (128 KiB mmap threshold, no dynamic raise), where every
# fresh temporary above it is mmapped and faults in again after each free.
import ctypes
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
before = faults_per_op()
applied = keep_freed_host_memory()
print(json.dumps({"before": before, "applied": applied, "after": faults_per_op()}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'serving'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_extra}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_activations_are_reused_without_page_faults():
    res = _probe({})
    assert res["applied"] is True
    # Each fresh 2 MiB temporary faults in 512 pages; reused heap memory faults in none.
    assert res["before"] > 500
    assert res["after"] < 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_switched_off_by_environment():
    res = _probe({"KUBEINFER_CPU_MALLOC_TUNING": "0"})
    assert res["applied"] is False
    assert res["after"] > 500  # glibc's defaults stay: the temporaries keep faulting
