"""Per-pod model state: ask each serving pod's ``GET /v1/models`` and summarise per model.

The serving pod reports every catalogue model with its ``state`` (``unloaded``, ``loading``,
``loaded``, ``failed``) and a ``message`` (the load error when failed); it has no Kubernetes API
access, so the operator polls it. Polls are bounded: a connect+read timeout per pod, at most
``concurrency`` pods at once, and a per-pod cache so a reconcile re-asks only pods that changed
(new resourceVersion) or whose answer is older than ``max_age`` seconds.

:func:`summarise` is pure: polled answers + the spec -> ``status.models`` entries
``{name, servedModelName, state, readyPods, loadedPods, failedPods, message}``; a pod reports
models by their served id, ``servedModelName`` (default ``name``).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubeinfer_operator.metrics import MODEL_POLLS
from kubeinfer_operator.spec import InferenceServiceSpec

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class PodModels:
    """One pod's answer.

    Attributes:
        pod: pod name.
        ready: the pod's Ready condition is True.
        models: model name -> (state, message) as the pod reported; empty when it did not answer.
        error: why the poll failed (timeout, connection refused, bad JSON), or None.
    """

    pod: str
    ready: bool
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    error: str | None = None


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's ``Ready`` condition is True."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def pod_endpoint(pod: Mapping[str, Any]) -> tuple[str, int] | None:
    """(pod IP, port of the container port named ``http``, else 8000) of a Running pod, or None."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP") or (pod.get("metadata") or {}).get(
        "deletionTimestamp"
    ):
        return None
    port = DEFAULT_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "http" and p.get("containerPort"):
                port = int(p["containerPort"])
    return status["podIP"], port


def fetch_models(ip: str, port: int, timeout: float) -> dict[str, tuple[str, str]]:
    """``GET http://IP:PORT/v1/models`` -> {model id: (state, message)}.

    Args:
        timeout: seconds for connect and for each read.

    Raises:
        OSError: connection failure or timeout; ValueError: not the expected JSON.
    """
    host = f"[{ip}]" if ":" in ip else ip
    with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=timeout) as r:  # noqa: S310 (pod IP)
        body = json.load(r)
    return {str(m["id"]): (str(m.get("state", "")), str(m.get("message") or "")) for m in body["data"]}


class ModelPoller:
    """Polls serving pods with a per-pod cache; thread-safe.

    Args:
        timeout: seconds per connect/read of one pod.
        concurrency: pods polled at once.
        max_age: seconds an unchanged pod's answer is reused.
        allowed_networks: pod IPs outside these networks are not polled (empty: any); for
            clusters where the operator must not open connections to some pod ranges.
    """

    def __init__(
        self,
        timeout: float = 2.0,
        concurrency: int = 8,
        max_age: float = 30.0,
        allowed_networks: Sequence[str] = (),
    ) -> None:
        self.timeout = timeout
        self.max_age = max_age
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model-poll")
        self._networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self._cache: dict[str, tuple[str, float, PodModels]] = {}  # uid -> (resourceVersion, when, answer)
        self._lock = threading.Lock()

    def _allowed(self, ip: str) -> bool:
        return not self._networks or any(ipaddress.ip_address(ip) in n for n in self._networks)

    def _poll_one(self, pod: Mapping[str, Any], ip: str, port: int) -> PodModels:
        name = pod["metadata"]["name"]
        try:
            answer = PodModels(name, pod_is_ready(pod), fetch_models(ip, port, self.timeout))
        except (OSError, ValueError, KeyError, TypeError) as err:
            MODEL_POLLS.labels(result="error").inc()
            return PodModels(name, pod_is_ready(pod), error=f"{type(err).__name__}: {err}")
        MODEL_POLLS.labels(result="ok").inc()
        return answer

    def poll(self, pods: Iterable[Mapping[str, Any]]) -> list[PodModels]:
        """Answers of every Running pod with an IP (cached ones reused), in pod-name order."""
        now = time.monotonic()
        results: dict[str, PodModels] = {}
        todo = []
        seen: set[str] = set()
        for pod in pods:
            endpoint = pod_endpoint(pod)
            if endpoint is None or not self._allowed(endpoint[0]):
                continue
            meta = pod["metadata"]
            uid, rv = meta.get("uid", meta["name"]), meta.get("resourceVersion", "")
            seen.add(uid)
            with self._lock:
                cached = self._cache.get(uid)
            if cached and cached[0] == rv and now - cached[1] < self.max_age:
                results[uid] = cached[2]
            else:
                todo.append((uid, rv, pod, endpoint))
        futures = [(uid, rv, self._pool.submit(self._poll_one, pod, *endpoint)) for uid, rv, pod, endpoint in todo]
        for uid, rv, fut in futures:
            answer = fut.result()
            results[uid] = answer
            with self._lock:
                self._cache[uid] = (rv, now, answer)
        with self._lock:  # forget pods that are gone
            for uid in [u for u in self._cache if u not in seen and u not in results]:
                if now - self._cache[uid][1] > self.max_age:
                    del self._cache[uid]
        return sorted(results.values(), key=lambda a: a.pod)


def summarise(spec: InferenceServiceSpec, answers: Sequence[PodModels]) -> list[dict[str, Any]]:
    """``status.models``: per spec model, over the pods that answered.

    ``readyPods``: Ready pods that answered; ``loadedPods``: those of them with the model loaded;
    ``failedPods``: pods (Ready or not: a pod whose preloaded model failed never becomes Ready)
    reporting the model failed.
    ``state``: ``Failed`` when some pod failed it and none has it loaded, ``Loaded`` when a pod
    has it, ``Loading`` while one loads it, else ``Pending`` (on-demand, not loaded yet, or no
    pod answered). ``message`` names the failing pod and its reason, or the poll errors.
    """
    answered = [a for a in answers if a.error is None]
    ready = sum(1 for a in answered if a.ready)
    errors = [f"{a.pod}: {a.error}" for a in answers if a.error is not None]
    out = []
    for model in spec.models:
        states = {a.pod: a.models.get(model.served_name, ("", "")) for a in answered}
        loaded = sum(1 for a in answered if a.ready and states[a.pod][0] == "loaded")
        failed = [(pod, msg) for pod, (s, msg) in states.items() if s == "failed"]
        loading = sum(1 for s, _ in states.values() if s == "loading")
        if failed and not loaded:
            state = "Failed"
            message = "; ".join(f"{pod}: {msg or 'load failed'}" for pod, msg in failed)
        elif loaded:
            state = "Loaded"
            message = f"loaded on {loaded} pod(s)" + (f"; failed on {len(failed)}" if failed else "")
        elif loading:
            state, message = "Loading", f"loading on {loading} pod(s)"
        elif answered:
            state = "Pending"
            message = "loaded on demand by the first request" if not model.preload else "not loaded yet"
        else:
            state = "Pending"
            message = "no serving pod answered /v1/models yet" + (f" ({'; '.join(errors)[:300]})" if errors else "")
        out.append({"name": model.name, "servedModelName": model.served_name, "state": state, "readyPods": ready,
                    "loadedPods": loaded, "failedPods": len(failed), "message": message[:1024]})
    return out


def model_summary(models: Sequence[Mapping[str, Any]]) -> str:
    """The MODELS printer column: ``name loaded/ready`` per model, comma-separated (e.g. ``tiny-llama 2/2``)."""
    return ", ".join(f"{m['name']} {m.get('loadedPods', 0)}/{m.get('readyPods', 0)}" for m in models)
