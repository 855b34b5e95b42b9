"""EndpointSlices -> the router's endpoints (the pure conversion), on EndpointSlice objects as the API
server returns them (``kubectl get endpointslices -l kubernetes.io/service-name=chat-pods -o json``)."""

from __future__ import annotations

import asyncio
import copy
import uuid

import pytest
from kubeinfer_router.discovery import (
    EndpointMap,
    KubernetesDiscovery,
    StaticDiscovery,
    endpoints_from_slices,
)


def _endpoint(ip: str, pod: str, ready: bool | None = True, terminating: bool | None = False,
              serving: bool | None = None) -> dict:
    conditions = {}
    if ready is not None:
        conditions["ready"] = ready
    if serving is not None or ready is not None:
        conditions["serving"] = ready if serving is None else serving
    if terminating is not None:
        conditions["terminating"] = terminating
    return {
        "addresses": [ip],
        "conditions": conditions,
        "nodeName": "node-1",
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "team-a", "uid": f"uid-{pod}"},
        "zone": "zone-a",
    }


def _slice(name: str, endpoints: list[dict], ports: list[dict] | None = None, family: str = "IPv4") -> dict:
    return {
        "addressType": family,
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": endpoints,
        "kind": "EndpointSlice",
        "metadata": {
            "generateName": "chat-pods-",
            "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                       "kubernetes.io/service-name": "chat-pods", "service.kubernetes.io/headless": ""},
            "name": name,
            "namespace": "team-a",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "chat-pods", "uid": "svc-uid",
                                 "blockOwnerDeletion": True, "controller": True}],
            "resourceVersion": "4242",
            "uid": f"uid-{name}",
        },
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}] if ports is None else ports,
    }


def test_ready_pods_become_urls_named_after_their_pods():
    sl = _slice("chat-pods-abcde", [_endpoint("10.244.0.7", "chat-7d9f-x1"), _endpoint("10.244.0.8", "chat-7d9f-x2")])
    assert endpoints_from_slices([sl]) == {
        "http://10.244.0.7:8000": ("chat-7d9f-x1", True),
        "http://10.244.0.8:8000": ("chat-7d9f-x2", True),
    }


def test_unready_and_terminating_pods_are_listed_not_ready_and_unknown_readiness_counts_as_ready():
    sl = _slice("chat-pods-abcde", [
        _endpoint("10.244.0.7", "starting", ready=False),
        _endpoint("10.244.0.8", "leaving", ready=False, terminating=True, serving=True),
        _endpoint("10.244.0.9", "unknown", ready=None, terminating=None),
    ])
    assert endpoints_from_slices([sl]) == {
        "http://10.244.0.7:8000": ("starting", False),
        "http://10.244.0.8:8000": ("leaving", False),
        "http://10.244.0.9:8000": ("unknown", True),
    }


def test_the_port_named_http_else_the_first_and_slices_without_a_port_give_nothing():
    named = _slice("a", [_endpoint("10.0.0.1", "p1")], ports=[{"name": "metrics", "port": 9090, "protocol": "TCP"},
                                                              {"name": "http", "port": 8080, "protocol": "TCP"}])
    unnamed = _slice("b", [_endpoint("10.0.0.2", "p2")], ports=[{"name": "", "port": 7000, "protocol": "TCP"}])
    portless = _slice("c", [_endpoint("10.0.0.3", "p3")], ports=[])
    all_ports = _slice("d", [_endpoint("10.0.0.4", "p4")], ports=[{"name": "", "port": None, "protocol": "TCP"}])
    assert endpoints_from_slices([named, unnamed, portless, all_ports]) == {
        "http://10.0.0.1:8080": ("p1", True),
        "http://10.0.0.2:7000": ("p2", True),
    }


def test_the_union_of_a_services_slices_and_an_address_in_two_slices_is_ready_if_either_says_so():
    first = _slice("chat-pods-aaaaa", [_endpoint("10.0.0.1", "p1"), _endpoint("10.0.0.2", "p2", ready=False)])
    second = _slice("chat-pods-bbbbb", [_endpoint("10.0.0.2", "p2"), _endpoint("10.0.0.3", "p3")])
    got = endpoints_from_slices([first, second])
    assert got == {"http://10.0.0.1:8000": ("p1", True), "http://10.0.0.2:8000": ("p2", True),
                   "http://10.0.0.3:8000": ("p3", True)}
    assert endpoints_from_slices([second, first]) == got


def test_dual_stack_keeps_each_pod_once_on_ipv4_and_ipv6_only_is_bracketed():
    v4 = _slice("chat-pods-v4", [_endpoint("10.0.0.1", "p1")])
    v6 = _slice("chat-pods-v6", [_endpoint("fd00::1", "p1"), _endpoint("fd00::2", "p2")], family="IPv6")
    assert endpoints_from_slices([v6, v4]) == {"http://10.0.0.1:8000": ("p1", True),
                                               "http://[fd00::2]:8000": ("p2", True)}


def test_fqdn_slices_and_endpoints_without_addresses_or_pods_are_handled():
    fqdn = _slice("f", [_endpoint("pod.example.com", "p1")], family="FQDN")
    bare = _slice("g", [{"addresses": ["10.0.0.5"], "conditions": {"ready": True}}, {"addresses": []}])
    empty = copy.deepcopy(bare)
    empty["endpoints"] = None  # a Service with no pods: the controller writes `endpoints: null`
    assert endpoints_from_slices([fqdn, bare, empty]) == {"http://10.0.0.5:8000": ("10.0.0.5", True)}


async def test_static_discovery_reports_its_list_once_each_named_by_its_url():
    got = []
    source = StaticDiscovery(["http://10.0.0.1:8000/", "http://10.0.0.2:8000"])
    await source.start(got.append)
    await source.stop()
    assert got == [{"http://10.0.0.1:8000": ("http://10.0.0.1:8000", True),
                    "http://10.0.0.2:8000": ("http://10.0.0.2:8000", True)}]


@pytest.mark.cluster
async def test_the_watch_follows_a_services_endpointslices_on_the_real_api_server(cluster):
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
    namespace = f"router-discovery-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})

    def body(name: str, service: str, endpoints: list[dict]) -> dict:
        sl = _slice(name, endpoints)
        sl["metadata"] = {"name": name, "namespace": namespace,
                          "labels": {"kubernetes.io/service-name": service,
                                     "endpointslice.kubernetes.io/managed-by": "kubeinfer-tests"}}
        for ep in endpoints:
            ep["targetRef"]["namespace"] = namespace
        return sl

    reports: asyncio.Queue[EndpointMap] = asyncio.Queue()

    async def until(expected: EndpointMap) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while (got := await asyncio.wait_for(reports.get(), deadline - asyncio.get_running_loop().time())) != expected:
            pass
        assert got == expected

    discovery.create_namespaced_endpoint_slice(namespace, body("chat-pods-a", "chat-pods", [_endpoint("10.0.0.1", "p1")]))
    discovery.create_namespaced_endpoint_slice(namespace, body("other-a", "other", [_endpoint("10.0.0.9", "x")]))
    source = KubernetesDiscovery("chat-pods", namespace, api_client=api_client)
    try:
        await source.start(reports.put_nowait)
        await until({"http://10.0.0.1:8000": ("p1", True)})  # the list
        discovery.create_namespaced_endpoint_slice(
            namespace, body("chat-pods-b", "chat-pods", [_endpoint("10.0.0.2", "p2", ready=False)]))
        await until({"http://10.0.0.1:8000": ("p1", True), "http://10.0.0.2:8000": ("p2", False)})  # watched
        discovery.patch_namespaced_endpoint_slice(
            "chat-pods-b", namespace, {"endpoints": [_endpoint("10.0.0.2", "p2", ready=True)]})
        await until({"http://10.0.0.1:8000": ("p1", True), "http://10.0.0.2:8000": ("p2", True)})
        discovery.delete_namespaced_endpoint_slice("chat-pods-a", namespace)
        await until({"http://10.0.0.2:8000": ("p2", True)})
        assert source.resyncs == 1  # one list, then only the watch
    finally:
        await source.stop()
        core.delete_namespace(namespace)
