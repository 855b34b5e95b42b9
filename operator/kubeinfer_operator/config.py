"""Operator settings read from the environment (the operator's own Deployment sets them).

Every value has a default, so ``kubeinfer-operator`` runs on a laptop with only a kubeconfig.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: The InferenceService API this operator serves (DESIGN.md section 3).
GROUP = "serving.kubeinfer.io"
VERSION = "v1alpha1"
PLURAL = "inferenceservices"
KIND = "InferenceService"

#: Server-side apply field manager: one fixed name, so every apply by any replica or restart
#: of the operator owns the same fields (Kubernetes API conventions, "Server-Side Apply").
FIELD_MANAGER = "kubeinfer-operator"

DEFAULT_SERVING_IMAGE = "ghcr.io/kubeinfer/kubeinfer-serving:0.1.0"
#: uid and gid of the serving container: the pod securityContext sets them, and serving/Dockerfile
#: creates that user (ARG KUBEINFER_UID, same default; tests/operator/test_render.py keeps them equal),
#: so libraries that look the user up (getpass, torch's cache dirs) find it.
SERVING_UID = 1000
#: uid and gid of the operator image's user (operator/Dockerfile ARG OPERATOR_UID, same default);
#: the activator pods run the operator's image as that user.
OPERATOR_UID = 65532
DEFAULT_OPERATOR_IMAGE = "ghcr.io/kubeinfer/kubeinfer-operator:0.1.0"

#: Prometheus that KEDA ScaledObjects query by default: kube-prometheus-stack's Service in
#: namespace ``monitoring``.
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"


@dataclass(frozen=True)
class OperatorConfig:
    """Settings that shape rendered children but are not part of an InferenceService spec.

    Attributes:
        serving_image: image used when ``spec.runtime.image`` is unset (env ``KUBEINFER_SERVING_IMAGE``).
        image_pull_policy: ``imagePullPolicy`` of the serving container (env ``KUBEINFER_IMAGE_PULL_POLICY``).
        startup_timeout_seconds: how long the startup probe lets a pod load its preloaded models
            before liveness checks start, in seconds (env ``KUBEINFER_STARTUP_TIMEOUT_SECONDS``).
        drain_seconds: time a terminating pod gets to finish in-flight requests after the preStop
            pause, in seconds (env ``KUBEINFER_DRAIN_SECONDS``).
        prometheus_url: Prometheus HTTP API that rendered KEDA ScaledObjects query when the isvc sets
            no ``scaling.prometheusAddress`` (env ``KUBEINFER_PROMETHEUS_URL``).
        keda_polling_seconds: KEDA ``pollingInterval`` of rendered ScaledObjects, in seconds
            (env ``KUBEINFER_KEDA_POLLING_SECONDS``); how often KEDA checks for activity at zero.
        model_poll: poll serving pods' ``/v1/models`` for ``status.models`` (env
            ``KUBEINFER_MODEL_POLL``, ``true``/``false``).
        model_poll_timeout_seconds: connect/read timeout per pod (env ``KUBEINFER_MODEL_POLL_TIMEOUT_SECONDS``).
        model_poll_concurrency: pods polled at once (env ``KUBEINFER_MODEL_POLL_CONCURRENCY``).
        model_poll_networks: CIDRs the operator may poll pods in, empty for any (env
            ``KUBEINFER_MODEL_POLL_NETWORKS``, comma-separated).
        activator_image: image of the activator pods of isvcs scaled to zero, the operator's own
            image (env ``KUBEINFER_ACTIVATOR_IMAGE``; the chart sets it).
        activator_retry_after_seconds: ``Retry-After`` of the activator's 503, in seconds (env
            ``KUBEINFER_ACTIVATOR_RETRY_AFTER_SECONDS``).
        image_pull_secrets: Secret names every pod the operator renders pulls its images with
            (serving pods add their ``spec.imagePullSecrets``); env ``KUBEINFER_IMAGE_PULL_SECRETS``,
            comma-separated (the chart sets it from its ``imagePullSecrets``).
        router_image: image of the fleet router pods (``routing.mode: router``), the operator's own
            image, which carries ``kubeinfer-router`` (env ``KUBEINFER_ROUTER_IMAGE``, else the
            activator image; the chart sets both).
    """

    serving_image: str = DEFAULT_SERVING_IMAGE
    image_pull_policy: str = "IfNotPresent"
    startup_timeout_seconds: int = 1800
    drain_seconds: int = 120
    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    keda_polling_seconds: int = 15
    model_poll: bool = True
    model_poll_timeout_seconds: float = 2.0
    model_poll_concurrency: int = 8
    model_poll_networks: tuple[str, ...] = ()
    activator_image: str = DEFAULT_OPERATOR_IMAGE
    activator_retry_after_seconds: int = 5
    router_image: str = DEFAULT_OPERATOR_IMAGE
    image_pull_secrets: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorConfig:
        """Build the settings from ``environ`` (default ``os.environ``).

        Raises:
            ValueError: a numeric variable is not a positive integer.
        """
        env = os.environ if environ is None else environ

        def positive(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            value = int(raw)
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {raw!r}")
            return value

        return cls(
            serving_image=env.get("KUBEINFER_SERVING_IMAGE") or DEFAULT_SERVING_IMAGE,
            image_pull_policy=env.get("KUBEINFER_IMAGE_PULL_POLICY") or "IfNotPresent",
            startup_timeout_seconds=positive("KUBEINFER_STARTUP_TIMEOUT_SECONDS", 1800),
            drain_seconds=positive("KUBEINFER_DRAIN_SECONDS", 120),
            prometheus_url=env.get("KUBEINFER_PROMETHEUS_URL") or DEFAULT_PROMETHEUS_URL,
            keda_polling_seconds=positive("KUBEINFER_KEDA_POLLING_SECONDS", 15),
            model_poll=(env.get("KUBEINFER_MODEL_POLL") or "true").lower() not in ("false", "0", "no"),
            model_poll_timeout_seconds=float(positive("KUBEINFER_MODEL_POLL_TIMEOUT_SECONDS", 2)),
            model_poll_concurrency=positive("KUBEINFER_MODEL_POLL_CONCURRENCY", 8),
            model_poll_networks=tuple(n.strip() for n in (env.get("KUBEINFER_MODEL_POLL_NETWORKS") or "").split(",")
                                      if n.strip()),
            activator_image=env.get("KUBEINFER_ACTIVATOR_IMAGE") or DEFAULT_OPERATOR_IMAGE,
            activator_retry_after_seconds=positive("KUBEINFER_ACTIVATOR_RETRY_AFTER_SECONDS", 5),
            image_pull_secrets=tuple(n.strip() for n in (env.get("KUBEINFER_IMAGE_PULL_SECRETS") or "").split(",")
                                     if n.strip()),
            router_image=(env.get("KUBEINFER_ROUTER_IMAGE") or env.get("KUBEINFER_ACTIVATOR_IMAGE")
                          or DEFAULT_OPERATOR_IMAGE),
        )
