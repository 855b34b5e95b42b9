"""Shutdown at the drain deadline (D5) and the exit status after a clean drain (D19), with ``kubeinfer-serve``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.api.conftest import MAX_MODEL_LEN, MODEL, _free_port, stop_process, wait_ready


@contextlib.contextmanager
def serve_subprocess(model_dir: Path, *flags: str, env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``kubeinfer-serve --model-dir`` as a subprocess with ``flags``; yields (base URL, process)."""
    port = _free_port()
    script = Path(sys.executable).with_name("kubeinfer-serve")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kubeinfer_serving"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--model-dir", str(model_dir), "--served-model-name", MODEL,
            "--max-model-len", str(MAX_MODEL_LEN), "--device", "cpu", "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            stop_process(proc)


LONG = {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True, "temperature": 0,
        "n": 8}


def test_d5_d19_requests_end_cleanly_at_the_drain_deadline_and_exit_is_0(model_dir: Path) -> None:
    with serve_subprocess(model_dir, "--timeout-graceful-shutdown", "1", "--max-num-seqs", "32") as (url, proc):
        results: dict[str, object] = {}
        started = threading.Event()

        def stream() -> None:
            lines = []
            with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
            results["stream"] = lines

        def plain() -> None:
            results["plain"] = httpx.post(f"{url}/v1/completions", json=LONG, timeout=60)

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        assert started.wait(30)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        rc = proc.wait(30)

    plain_resp = results["plain"]
    assert isinstance(plain_resp, httpx.Response)
    assert plain_resp.status_code == 503, plain_resp.text
    assert plain_resp.headers["content-type"].startswith("application/json")
    assert plain_resp.json()["error"]["code"] == "server_shutting_down"
    assert int(plain_resp.headers["retry-after"]) >= 1
    lines = results["stream"]
    assert lines[-1] == "data: [DONE]"
    error_event = json.loads(lines[-2].removeprefix("data: "))
    assert error_event["error"]["code"] == "server_shutting_down"
    assert rc == 0
