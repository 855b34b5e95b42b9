"""A loopback fleet: N real ``kubeinfer-serve`` processes with one catalogue, and ``kubeinfer-router`` in front.

Used by :mod:`bench.fleet_bench` and the router's loopback tests (``tests/router``). Every process
is started as ``[sys.executable, "-m", ...]`` with ``PYTHONPATH`` naming this checkout's
``serving``, ``operator`` and ``router`` directories (so it runs this checkout's code, not
whatever the environment has installed) and ``OMP_NUM_THREADS=1``, on a free 127.0.0.1 port.

Pod readiness is ``GET /ready`` == 200; router readiness is its ``GET /ready`` == 200 (discovery
synced). Counters are read from each pod's ``/metrics`` (Prometheus text, summed over labels).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from kubeinfer_serving.models.builtin import BUILTIN_MODEL_NAME, ensure_builtin_model

REPO = Path(__file__).resolve().parent.parent
#: Seconds a process gets to come up (a cold torch import on a busy 2-core machine is slow).
START_TIMEOUT = 240.0
#: Seconds a process gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 20.0

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of the fleet's processes: this checkout first on ``PYTHONPATH``, one torch thread."""
    paths = [str(REPO / d) for d in ("serving", "operator", "router")] + [str(REPO)]
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])), OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def model_names(count: int) -> list[str]:
    """The fleet's model names: ``tiny-llama-0`` .. ``tiny-llama-{count-1}`` (copies of the built-in model)."""
    return [f"{BUILTIN_MODEL_NAME}-{i}" for i in range(count)]


def catalogue(count: int, *, kv_cache_bytes: int, max_model_len: int = 2048, max_num_seqs: int = 64,
              kv_overrides: dict[str, int] | None = None) -> dict:
    """A catalogue of ``count`` on-demand copies of the built-in tiny model, one loaded at a time.

    Args:
        count: models in the catalogue.
        kv_cache_bytes: each model's KV pool, bytes (small pools make prefix-cache locality matter).
        max_model_len: context length, tokens.
        max_num_seqs: batch slots per engine.
        kv_overrides: model name -> its own KV pool in bytes (the entry's ``kvCacheBytes``).
    """
    overrides = kv_overrides or {}
    return {
        "maxLoadedModels": 1, "memoryBudgetBytes": 2 * 1024**3, "kvCacheBytes": kv_cache_bytes,
        "maxNumSeqs": max_num_seqs, "maxNumBatchedTokens": 2048,
        "models": [{"name": n, "source": f"builtin://{BUILTIN_MODEL_NAME}", "maxModelLen": max_model_len,
                    **({"kvCacheBytes": overrides[n]} if n in overrides else {})}
                   for n in model_names(count)],
    }


def kv_bytes_per_token() -> int:
    """KV-cache bytes one token of the built-in tiny model takes on a CPU pod (K and V, every layer,
    float32: the engine's CPU dtype), from its ``config.json``."""
    config = json.loads((ensure_builtin_model() / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4


def tokenizer():
    """The built-in tiny model's tokenizer (``tokenizers.Tokenizer``), to size prompts in tokens."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ensure_builtin_model() / "tokenizer.json"))


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    """Poll ``url`` (a ``/ready``) until 200.

    Raises:
        RuntimeError: the process exited, or it was not ready within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:g} s: {last}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``, SIGKILL it if it is still there after :data:`STOP_TIMEOUT` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def counter(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name{labels...}`` in ``base_url``'s ``/metrics`` (0.0 when none)."""
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@dataclass
class Pod:
    """One ``kubeinfer-serve`` process."""

    url: str
    proc: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL: the pod vanishes mid-request, as a crashed node's would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def unload_all(self) -> None:
        """Unload every loaded model (a clean start for a measurement)."""
        for card in httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]:
            if card["state"] == "loaded" and not card["preload"]:
                httpx.post(f"{self.url}/admin/models/{card['id']}/unload", timeout=60).raise_for_status()


@dataclass
class Fleet:
    """N pods with one catalogue, and the routers started over them; :meth:`close` stops everything.

    Args:
        pods: how many serving processes.
        models: catalogue size (copies of the built-in tiny model, ``maxLoadedModels: 1``).
        kv_cache_bytes: each model's KV pool in bytes.
        kv_overrides: model name -> its own KV pool in bytes.
        log_dir: where each process's stdout/stderr go (default a temporary directory).
        pod_cpus, router_cpus: CPU sets (``os.sched_setaffinity``) the pods and the routers run on;
            None: anywhere. Disjoint sets keep the router's CPU time off the pods' cores, as in a
            cluster where the router runs in pods of its own.
    """

    pods: int = 3
    models: int = 3
    kv_cache_bytes: int = 64 * 1024**2
    kv_overrides: dict[str, int] | None = None
    log_dir: Path | None = None
    pod_cpus: frozenset[int] | None = None
    router_cpus: frozenset[int] | None = None
    members: list[Pod] = field(default_factory=list, init=False)
    routers: list[subprocess.Popen] = field(default_factory=list, init=False)
    _logs: list = field(default_factory=list, init=False, repr=False)

    def start(self) -> Fleet:
        """Start the pods (in parallel) and wait until each is ready."""
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="kubeinfer-fleet-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.log_dir / "models.yaml"
        config.write_text(yaml.safe_dump(catalogue(self.models, kv_cache_bytes=self.kv_cache_bytes,
                                                kv_overrides=self.kv_overrides)))
        ensure_builtin_model()  # built once here, not raced by N pods
        try:
            for _ in range(self.pods):
                self._spawn_pod()
            for pod in self.members:
                wait_ready(f"{pod.url}/ready", pod.proc)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn_pod(self) -> Pod:
        assert self.log_dir is not None
        port = free_port()
        cmd = [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--port", str(port),
               "--models-config", str(self.log_dir / "models.yaml"), "--device", "cpu", "--log-level", "warning"]
        pod = Pod(f"http://127.0.0.1:{port}", self._spawn(cmd, f"pod-{len(self.members)}", self.pod_cpus))
        self.members.append(pod)
        return pod

    def router(self, endpoints: list[str] | None = None, *extra: str) -> str:
        """Start ``kubeinfer-router`` over ``endpoints`` (default every pod); returns its base URL.

        Args:
            endpoints: pod base URLs.
            extra: more command-line flags (e.g. ``--max-retries 1``).
        """
        port = free_port()
        cmd = [sys.executable, "-m", "kubeinfer_router", "--host", "127.0.0.1", "--port", str(port),
               "--endpoints", ",".join(endpoints or self.urls), "--log-level", "warning", *extra]
        proc = self._spawn(cmd, f"router-{len(self.routers)}", self.router_cpus)
        self.routers.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/ready", proc)
        return url

    @property
    def urls(self) -> list[str]:
        """The pods' base URLs."""
        return [p.url for p in self.members]

    def total(self, name: str, **labels: str) -> float:
        """Counter ``name`` summed over the pods that are still running."""
        return sum(counter(p.url, name, **labels) for p in self.members if p.proc.poll() is None)

    def unload_all(self) -> None:
        """Unload every model on every running pod."""
        for pod in self.members:
            if pod.proc.poll() is None:
                pod.unload_all()

    def close(self) -> None:
        """Stop the routers and the pods (SIGTERM to all, then wait; SIGKILL what is left) and close their logs."""
        procs = [p for p in self.routers + [m.proc for m in self.members] if p.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(Exception):
                stop(proc)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def _spawn(self, cmd: list[str], name: str, cpus: frozenset[int] | None) -> subprocess.Popen:
        assert self.log_dir is not None
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        return subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=pin)

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
