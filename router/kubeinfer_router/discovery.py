"""Where the serving pods are: a fixed ``--endpoints`` list, or a Kubernetes Service's EndpointSlices.

Both sources report the whole current set as an :data:`EndpointMap` (``url -> (name, ready)``) to
one callback on the asyncio loop, which hands it to :meth:`EndpointTable.sync
<kubeinfer_router.state.EndpointTable.sync>`. The first report marks the source as synced (the
router's ``/ready``).

Kubernetes: :class:`KubernetesDiscovery` lists the EndpointSlices labelled
``kubernetes.io/service-name=SERVICE`` and then *watches* them (no polling) with the official
``kubernetes`` client, whose watch blocks, so it runs in a daemon thread and feeds the loop with
``loop.call_soon_threadsafe``. When the watch's resource version expires (410 Gone) or the
connection fails it lists again (a resync) and watches from the new version. How an EndpointSlice
becomes endpoints is the pure function :func:`endpoints_from_slices`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

log = logging.getLogger("kubeinfer.router.discovery")

#: url -> (name, ready): what every source reports (the argument of ``EndpointTable.sync``).
EndpointMap = dict[str, tuple[str, bool]]
#: The label the EndpointSlice controller puts on a Service's slices.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: The serving pod's port name in the Service; without it the slice's first port is used.
PORT_NAME = "http"
#: Seconds the API server keeps one watch request open before it ends it (the client then watches on).
WATCH_SECONDS = 240
#: Seconds to wait before listing again after an API error other than 410.
ERROR_BACKOFF_SECONDS = (1.0, 30.0)


class EndpointSource(Protocol):
    """What the router needs of an endpoint source (:class:`StaticDiscovery`, :class:`KubernetesDiscovery`)."""

    async def start(self, on_change: Callable[[EndpointMap], None]) -> None:
        """Begin reporting: ``on_change`` gets the whole endpoint set on the running loop, first and on each change."""

    async def stop(self) -> None:
        """Stop reporting."""


def endpoints_from_slices(slices: Iterable[Mapping[str, Any]], port_name: str = PORT_NAME) -> EndpointMap:
    """The endpoints of a Service from its EndpointSlices (API JSON, camelCase, as ``kubectl get -o json``).

    Per slice the port named ``port_name`` is taken, else the slice's first port; a slice with no
    port number (or an ``FQDN`` address type) contributes nothing. Each endpoint's first address
    becomes ``http://ADDRESS:PORT`` (IPv6 in brackets), named after its ``targetRef`` (the pod)
    else the address. ``conditions.ready`` missing means ready (the API's rule for an unknown
    state); a terminating endpoint is never ready. An address in several slices is ready if any
    slice says so; a pod in both an IPv4 and an IPv6 slice (dual stack) is kept once, IPv4 first.

    Args:
        slices: ``discovery.k8s.io/v1`` EndpointSlice objects as dicts.
        port_name: the port to route to.

    Returns:
        url -> (name, ready), unready endpoints included with ``ready=False``.
    """
    found: EndpointMap = {}
    pods: dict[str, str] = {}  # pod (namespace/name) -> url already taken
    ordered = sorted(slices, key=lambda s: (s.get("addressType") != "IPv4", (s.get("metadata") or {}).get("name", "")))
    for sl in ordered:
        family = sl.get("addressType", "IPv4")
        if family not in ("IPv4", "IPv6"):
            continue
        ports = sl.get("ports") or []
        port = next((p for p in ports if p.get("name") == port_name), ports[0] if ports else None)
        if port is None or port.get("port") is None:
            continue
        for ep in sl.get("endpoints") or []:
            addresses = ep.get("addresses") or []
            if not addresses:
                continue
            host = f"[{addresses[0]}]" if family == "IPv6" else addresses[0]
            url = f"http://{host}:{port['port']}"
            conditions = ep.get("conditions") or {}
            ready = conditions.get("ready") is not False and conditions.get("terminating") is not True
            ref = ep.get("targetRef") or {}
            name = ref.get("name") or addresses[0]
            pod = f"{ref.get('namespace', '')}/{ref['name']}" if ref.get("name") else None
            if pod is not None and pods.get(pod, url) != url:
                continue  # the pod's other address family, already listed
            if pod is not None:
                pods[pod] = url
            previous = found.get(url)
            found[url] = (name, ready or (previous is not None and previous[1]))
    return found


class StaticDiscovery:
    """A fixed list of endpoints (``--endpoints``), each named by its URL and always ready.

    Args:
        urls: base URLs (``http://HOST:PORT``).
    """

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = [u.rstrip("/") for u in urls]

    async def start(self, on_change: Callable[[EndpointMap], None]) -> None:
        """Report the list once (the router is synced from then on)."""
        on_change({u: (u, True) for u in self.urls})

    async def stop(self) -> None:
        """Nothing runs: no-op (the same interface as :class:`KubernetesDiscovery`)."""


class KubernetesDiscovery:
    """Watch a Service's EndpointSlices and report its endpoints on every change.

    Args:
        service: the Service's name (its slices carry ``kubernetes.io/service-name=service``).
        namespace: the Service's namespace.
        api_client: a ``kubernetes.client.ApiClient`` (None: the in-cluster configuration,
            else ``~/.kube/config``).
        port_name: the port to route to (see :func:`endpoints_from_slices`).

    The watch thread runs until :meth:`stop`; it is a daemon thread, so it never holds the
    process open.
    """

    def __init__(self, service: str, namespace: str, api_client: Any = None, port_name: str = PORT_NAME) -> None:
        self.service = service
        self.namespace = namespace
        self.port_name = port_name
        self._api_client = api_client
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self.resyncs = 0  # full lists done (the first one included)

    async def start(self, on_change: Callable[[EndpointMap], None]) -> None:
        """Start the watch thread; ``on_change`` is called on this loop with each new endpoint set.

        Raises:
            kubernetes.config.ConfigException: no in-cluster configuration and no kubeconfig.
        """
        from kubernetes import client, config

        if self._api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        loop = asyncio.get_running_loop()
        api = client.DiscoveryV1Api(self._api_client)

        def report(endpoints: EndpointMap) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the router is gone
                loop.call_soon_threadsafe(on_change, endpoints)

        self._thread = threading.Thread(target=self._run, args=(api, report), daemon=True,
                                        name=f"endpointslices-{self.service}")
        self._thread.start()

    async def stop(self) -> None:
        """Stop the watch (the thread leaves at its next event or request timeout)."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self, api: Any, report: Callable[[EndpointMap], None]) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        selector = f"{SERVICE_NAME_LABEL}={self.service}"
        delay = ERROR_BACKOFF_SECONDS[0]
        while not self._stopping.is_set():
            try:
                resp = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector,
                                                          _preload_content=False, _request_timeout=30)
                listing = json.loads(resp.data)
                self.resyncs += 1
                slices = {s["metadata"]["name"]: s for s in listing.get("items") or []}
                version = listing["metadata"]["resourceVersion"]
                report(endpoints_from_slices(slices.values(), self.port_name))
                delay = ERROR_BACKOFF_SECONDS[0]
                while not self._stopping.is_set():
                    self._watch = watch.Watch()
                    for event in self._watch.stream(
                        api.list_namespaced_endpoint_slice, self.namespace, label_selector=selector,
                        resource_version=version, allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                        _request_timeout=WATCH_SECONDS + 30,
                    ):
                        obj = event["raw_object"]
                        if event["type"] == "ERROR":
                            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        if event["type"] == "DELETED":
                            slices.pop(obj["metadata"]["name"], None)
                        else:
                            slices[obj["metadata"]["name"]] = obj
                        report(endpoints_from_slices(slices.values(), self.port_name))
            except ApiException as exc:
                if exc.status == 410:
                    log.info("EndpointSlice watch of %s expired (410): listing again", self.service)
                    continue
                log.warning("EndpointSlice list/watch of %s/%s failed (%s %s); retrying in %.0f s",
                            self.namespace, self.service, exc.status, exc.reason, delay)
            except Exception as exc:  # connection errors of urllib3 and the like: never end the thread
                if self._stopping.is_set():
                    return
                log.warning("EndpointSlice list/watch of %s/%s failed (%s); retrying in %.0f s",
                            self.namespace, self.service, exc, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, ERROR_BACKOFF_SECONDS[1])
