"""``kubeinfer-serve`` as a container's PID 1: a SIGTERM during start-up ends it at once.

PID 1 gets no default signal actions, so without the entry point's early handler a pod deleted
while it imports torch would ignore SIGTERM and hold its node (and GPU) for the whole
terminationGracePeriodSeconds. The test runs the entry point as PID 1 of a new PID namespace
(``unshare --pid``, root only) and signals it before the server can have started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pid1_child(unshare_pid: int, timeout: float = 10.0) -> int:
    """The host PID of the process ``unshare --fork`` started (PID 1 of its namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children")
        if children.exists() and children.read_text().split():
            return int(children.read_text().split()[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
@pytest.mark.parametrize(("entry", "ends"), [("kubeinfer_serving.entrypoint", True), ("kubeinfer_serving", False)])
def test_sigterm_while_starting_as_pid_1(entry, ends, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "serving"), str(REPO / "operator")])}
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", entry,
                             "--port", "0", "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = _pid1_child(proc.pid)
        time.sleep(0.5)  # inside the imports: uvicorn's handlers are seconds away
        os.kill(child, signal.SIGTERM)
        try:
            code = proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            code = None
        if ends:
            assert code is not None, "SIGTERM during start-up was ignored by PID 1"
        else:  # without the early handler (python -m) PID 1 ignores it: what the entry point fixes
            assert code is None
    finally:
        if proc.poll() is None:
            os.kill(_pid1_child(proc.pid), signal.SIGKILL)
            proc.wait(timeout=10)
