"""``make gpu-check`` on a machine without CUDA: it says so, writes that in its report and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine gpu-check measures (minutes)")
def test_gpu_check_without_cuda_says_it_needs_cuda_and_exits_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "serving"))
    proc = subprocess.run([sys.executable, "-m", "kubeinfer_serving.bench.gpu_check", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "make gpu-check needs a CUDA device" in proc.stderr
    report = json.loads(out.read_text())
    assert report["cuda"] is False and "nothing was measured" in report["skipped"]
