"""A small dict-in, dict-out Kubernetes client on top of the official ``kubernetes`` package.

Only the calls the reconciler makes: GET, server-side apply and DELETE of one object, an
API discovery probe, and a JSON merge patch of an InferenceService's status subresource. Objects stay plain dicts
(camelCase, as the API serves them), so renderers and tests never touch generated models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config

from kubeinfer_operator.config import FIELD_MANAGER, GROUP, PLURAL, VERSION
from kubeinfer_operator.metrics import HEALTH, record_api_error

#: (apiVersion, kind) -> (API path prefix, plural) of every kind the operator touches.
_RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("keda.sh/v1alpha1", "ScaledObject"): ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    (f"{GROUP}/{VERSION}", "InferenceService"): (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0 when no response came back)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def invalid(self) -> bool:
        """The server rejected the object's content (422 Unprocessable Entity, or 400 Bad Request)."""
        return self.status in (400, 422)


def load_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient from ``kubeconfig``, else ``$KUBECONFIG`` (first path), else in-cluster
    service-account credentials, else ``~/.kube/config``.

    ``$KUBECONFIG`` is read at call time (the ``kubernetes`` package reads it at import).

    Raises:
        kubernetes.config.ConfigException: no usable credentials were found.
    """
    path = kubeconfig or (os.environ.get("KUBECONFIG") or "").split(os.pathsep)[0] or None
    if path:
        return config.new_client_from_config(config_file=path)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    return config.new_client_from_config(config_file=str(Path.home() / ".kube" / "config"))


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """URL path of a namespaced object (or its collection when ``name`` is None).

    Raises:
        KeyError: a kind this client does not know.
    """
    prefix, plural = _RESOURCES[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class Kube:
    """Synchronous JSON client; thread-safe as the underlying urllib3 pool is."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._call_status(method, path, **kwargs)[1]

    def _call_status(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        """One API call: (HTTP status, JSON body)."""
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*request, _request_timeout=30)
            response.read()
        except client.exceptions.ApiException as err:
            raise _counted(_kube_error(err.status or 0, err.reason or "", err.body)) from err
        except Exception as err:  # connection refused, TLS errors, timeouts
            raise _counted(KubeError(0, type(err).__name__, str(err))) from err
        if not 200 <= response.status <= 299:
            raise _counted(_kube_error(response.status, response.reason or "", response.data))
        HEALTH.api_ok()
        return response.status, (json.loads(response.data) if response.data else {})

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist (404).

        Raises:
            KubeError: any other failure.
        """
        try:
            return self._call("GET", object_path(api_version, kind, namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete the object (background propagation); False when it was already gone (404).

        Raises:
            KubeError: any other failure.
        """
        try:
            self._call(
                "DELETE", object_path(api_version, kind, namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
        except KubeError as err:
            if err.status == 404:
                return False
            raise
        return True

    def serves(self, group_version: str) -> bool:
        """Whether the API server serves ``group_version`` (e.g. ``keda.sh/v1alpha1``), i.e. its
        CRD is installed; asked through discovery, which every authenticated user may read.

        Raises:
            KubeError: a failure other than 404.
        """
        try:
            self._call("GET", f"/apis/{group_version}")
        except KubeError as err:
            if err.status == 404:
                return False
            raise
        return True

    def list_isvcs(self, namespace: str | None) -> list[dict[str, Any]]:
        """InferenceServices in ``namespace``, or in every namespace when None.

        Raises:
            KubeError: the list failed.
        """
        prefix, plural = _RESOURCES[(f"{GROUP}/{VERSION}", "InferenceService")]
        path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
        return list(self._call("GET", path).get("items") or [])

    def apply_status(self, obj: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Server-side apply ``obj`` as field manager ``kubeinfer-operator`` with force (the
        operator is the single owner of the fields it sets); returns (created: HTTP 201 rather
        than 200, the stored object).

        Raises:
            KubeError: e.g. 422 when the server rejects the object's content.
        """
        meta = obj["metadata"]
        status, body = self._call_status(
            "PATCH",
            object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"]),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            body=dict(obj),
            content_type="application/apply-patch+yaml",
        )
        return status == 201, body

    def patch_isvc_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """JSON merge patch of ``status`` through the InferenceService's status subresource.

        Top-level status keys in ``status`` replace the stored ones (lists are replaced whole).

        Raises:
            KubeError: 404 when the object is gone, or any other failure.
        """
        path = object_path(f"{GROUP}/{VERSION}", "InferenceService", namespace, name) + "/status"
        return self._call("PATCH", path, body={"status": dict(status)}, content_type="application/merge-patch+json")


def _counted(err: KubeError) -> KubeError:
    """``err``, counted in ``kubeinfer_operator_api_errors_total`` unless it is a 404 (an absent
    object is an answer, not a failure); an answer at all proves the API reachable."""
    if err.status == 404:
        HEALTH.api_ok()
    else:
        record_api_error(err.status)
    return err


def _kube_error(status: int, reason: str, body: Any) -> KubeError:
    message = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        message = json.loads(message).get("message", message)
    except (ValueError, AttributeError):
        pass
    return KubeError(status, reason, message)
