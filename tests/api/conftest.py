"""Fixtures of the API tests: real uvicorn servers on loopback ports, driven over HTTP.

* ``server``: the production provider (the multi-model registry) over a catalogue like the
  default one (tiny-llama + all-minilm-l6-v2, preloaded) plus an on-demand copy of tiny-llama,
  in one uvicorn server in a background thread for the whole session;
* ``cli_server``: ``kubeinfer-serve --model-dir ...`` (single-model mode) as a subprocess started
  from the console script, with one batch slot and a one-request queue (the 429 test).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.models.builtin import (
    BUILTIN_EMBEDDING_MODEL_NAME,
    BUILTIN_MODEL_NAME,
    ensure_builtin_model,
)
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry
from kubeinfer_serving.registry.protocol import ModelKind

MODEL = BUILTIN_MODEL_NAME
EMBED_MODEL = BUILTIN_EMBEDDING_MODEL_NAME
#: Not preloaded: loaded by the first request or the admin API.
ON_DEMAND_MODEL = "tiny-llama-on-demand"
#: Context length of the test servers (tokens): small, so overflow cases are cheap to build.
MAX_MODEL_LEN = 1024


def wait_ready(base_url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``/ready`` until 200; fail with the server's state when it does not come up."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base_url}/ready", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"server at {base_url} not ready after {timeout} s: {last}")


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server the test started: SIGTERM, wait up to ``timeout`` seconds for it to drain and
    exit, then SIGKILL (and reap it either way)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
        )
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout: float = 180.0) -> None:
        """Start serving and wait (up to ``timeout`` seconds) until ``/ready`` says 200."""
        self._thread.start()
        wait_ready(self.base_url, timeout=timeout)

    def stop(self) -> None:
        """Graceful shutdown (the lifespan shuts the provider down)."""
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The built-in tiny Llama directory (built once per machine)."""
    return ensure_builtin_model()


@pytest.fixture(scope="session")
def provider(model_dir: Path) -> ModelRegistry:
    """The registry behind the in-process server, with small engines (8 sequences, 1024-token context)."""
    catalogue = Catalogue(
        models=[
            ModelEntry(name=MODEL, source=f"builtin://{MODEL}", preload=True, max_model_len=MAX_MODEL_LEN),
            ModelEntry(name=EMBED_MODEL, source=f"builtin://{EMBED_MODEL}", kind=ModelKind.EMBED, preload=True),
            ModelEntry(name=ON_DEMAND_MODEL, source=str(model_dir), max_model_len=MAX_MODEL_LEN),
        ],
        max_num_seqs=8,
        max_num_batched_tokens=512,
        memory_budget_bytes=4 * 1024**3,
    )
    return ModelRegistry(catalogue, device="cpu")


@pytest.fixture(scope="session")
def server(provider: ModelRegistry) -> Iterator[ServerThread]:
    """One real uvicorn server for the session."""
    srv = ServerThread(create_app(provider, settings=ServerSettings(host="127.0.0.1", port=0)))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: ServerThread) -> openai.OpenAI:
    """The official OpenAI client pointed at the server; no retries, so 429/503 surface as errors."""
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(base_url: str, model: str = MODEL, timeout: float = 30.0) -> None:
    """Poll ``/metrics`` until ``model`` has no running or waiting request and no KV block in use."""
    deadline = time.monotonic() + timeout
    while True:
        state = {n: metric_value(base_url, n, model_name=model) for n in
                 ("kubeinfer_num_requests_running", "kubeinfer_queue_length", "kubeinfer_kv_cache_usage_ratio")}
        if not any(state.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{model} not idle after {timeout} s: {state}")
        time.sleep(0.05)


def metric_value(base_url: str, name: str, **labels: str) -> float:
    """The value of sample ``name{labels}`` in ``/metrics`` (0.0 when absent)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cli_server(model_dir: Path) -> Iterator[str]:
    """``kubeinfer-serve`` as a subprocess with one running slot and a one-request waiting queue."""
    port = _free_port()
    script = Path(sys.executable).with_name("kubeinfer-serve")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kubeinfer_serving"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--model-dir", str(model_dir),
            "--served-model-name", MODEL, "--max-num-seqs", "1", "--max-waiting-requests", "1",
            "--max-model-len", str(MAX_MODEL_LEN), "--device", "cpu", "--log-level", "warning"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, proc=proc)
        yield base_url
    finally:
        stop_process(proc)
