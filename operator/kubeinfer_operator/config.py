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
    """

    serving_image: str = DEFAULT_SERVING_IMAGE
    image_pull_policy: str = "IfNotPresent"
    startup_timeout_seconds: int = 1800
    drain_seconds: int = 120

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
        )
