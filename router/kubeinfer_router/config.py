"""Settings of the fleet router, from command-line flags and ``KUBEINFER_ROUTER_*`` environment variables.

Precedence, as for ``kubeinfer-serve``: a flag given on the command line, else the environment
variable, else the default. Each field ``foo_bar`` reads ``KUBEINFER_ROUTER_FOO_BAR`` (e.g.
``KUBEINFER_ROUTER_PORT=9000``, ``KUBEINFER_ROUTER_ENDPOINTS=http://10.0.0.1:8000,http://10.0.0.2:8000``).
Exactly one endpoint source is required: ``--endpoints`` (a fixed list) or ``--kube-service``
(the ready endpoints of a Kubernetes Service, watched).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kubeinfer_router.affinity import DEFAULT_MAX_KEYS, DEFAULT_TTL_SECONDS

ENV_PREFIX = "KUBEINFER_ROUTER_"
#: Where a pod finds its own namespace (the service-account mount), the default of ``--kube-namespace``.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class RouterSettings(BaseModel):
    """Everything ``kubeinfer-router`` is configured with.

    Attributes:
        host: address to bind (``0.0.0.0`` in a container).
        port: TCP port.
        endpoints: fixed serving-pod base URLs (``http://HOST:PORT``, no path), or None with
            ``kube_service``. From the environment: one comma-separated string.
        kube_service: watch the EndpointSlices of this Service (label
            ``kubernetes.io/service-name=NAME``); ready addresses only, port named ``http`` else the first.
        kube_namespace: the Service's namespace (None: the pod's own, from the service-account
            mount, else ``default``).
        isvc: the InferenceService's name, used in messages (None: the Service's name or "the fleet").
        load_factor: CHWBL bound: an endpoint takes a request only while its in-flight count + 1
            <= ceil(mean load x load_factor) (>= 1).
        virtual_nodes: points per endpoint on the consistent-hash ring.
        prefix_chars: characters of the prompt's start (first user message for chat) in the routing key.
        affinity_ttl_seconds: how long the router remembers that an endpoint served a routing key
            (and so probably still caches its prefix) without another request of the key there.
        affinity_keys: most routing keys remembered (least recently used forgotten first).
        imbalance_min_requests: the imbalance gate opens only above this many in-flight requests
            on the busiest endpoint.
        imbalance_ratio: ... and when the busiest has more than this times the least busy's.
        poll_interval_seconds: seconds between two polls of each endpoint's ``GET /kubeinfer/load``.
        hold_timeout_seconds: longest a request waits for a usable endpoint (scale from zero,
            all ejected); then 503 + ``Retry-After`` with code ``no_ready_endpoints``.
        max_held_requests: most requests held at once; beyond it 503 at once.
        max_retries: most retries of one request on another endpoint (only before anything was
            sent to the client, only for a connection error or a draining pod's 503).
        eject_after_failures: consecutive failures (connection error, 5xx) that eject an endpoint.
        eject_base_seconds: first ejection's length; each further one doubles, with +-20% jitter.
        eject_max_seconds: longest ejection.
        max_body_bytes: largest request body read; bigger gets 413 (the pod's default limit).
        connect_timeout_seconds: seconds to open a TCP connection to an endpoint; beyond it the
            attempt counts as a connection error (retried elsewhere, a failure for ejection).
        timeout_graceful_shutdown: seconds in-flight requests get to finish after SIGTERM.
        log_level: log level of the router's logger.
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    endpoints: list[str] | None = None
    kube_service: str | None = None
    kube_namespace: str | None = None
    isvc: str | None = None
    load_factor: float = Field(1.25, ge=1.0)
    virtual_nodes: int = Field(256, ge=1, le=10_000)
    prefix_chars: int = Field(100, ge=0)
    affinity_ttl_seconds: float = Field(DEFAULT_TTL_SECONDS, gt=0)
    affinity_keys: int = Field(DEFAULT_MAX_KEYS, ge=1)
    imbalance_min_requests: int = Field(64, ge=0)
    imbalance_ratio: float = Field(1.5, ge=1.0)
    poll_interval_seconds: float = Field(1.0, gt=0)
    hold_timeout_seconds: float = Field(60.0, ge=0)
    max_held_requests: int = Field(1000, ge=0)
    max_retries: int = Field(2, ge=0)
    eject_after_failures: int = Field(3, ge=1)
    eject_base_seconds: float = Field(2.0, gt=0)
    eject_max_seconds: float = Field(60.0, gt=0)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    timeout_graceful_shutdown: float = Field(30.0, ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            urls = [str(v).strip().rstrip("/") for v in value if str(v).strip()]
            for url in urls:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                    raise ValueError(f"{url!r} is not a base URL like http://10.0.0.1:8000")
            if len(set(urls)) != len(urls):
                raise ValueError("an endpoint is listed twice")
            return urls or None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> RouterSettings:
        if (self.endpoints is None) == (self.kube_service is None):
            raise ValueError("give exactly one endpoint source: --endpoints or --kube-service")
        if self.kube_namespace is not None and self.kube_service is None:
            raise ValueError("--kube-namespace needs --kube-service")
        if self.eject_max_seconds < self.eject_base_seconds:
            raise ValueError("--eject-max-seconds must be at least --eject-base-seconds")
        return self

    def namespace(self) -> str:
        """The Kubernetes namespace to watch: ``kube_namespace``, else the pod's own, else ``default``."""
        if self.kube_namespace:
            return self.kube_namespace
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
        except OSError:
            return "default"

    def service_name(self) -> str:
        """How messages name the fleet: the isvc, else the Service, else "the fleet"."""
        return self.isvc or self.kube_service or "the fleet"

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of ``field`` (``KUBEINFER_ROUTER_`` + upper case)."""
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_sources(cls, cli: Mapping[str, object], env: Mapping[str, str] | None = None) -> RouterSettings:
        """Merge flags over environment variables over defaults.

        Args:
            cli: parsed flags; None values mean "not given".
            env: the environment (default ``os.environ``).

        Raises:
            ValueError: a value is invalid (the message names the flag and variable).
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name in cls.model_fields:
            if cli.get(name) is not None:
                values[name] = cli[name]
            elif env.get(cls.env_name(name), "") != "":
                values[name] = env[cls.env_name(name)]
        try:
            return cls(**values)
        except ValidationError as exc:
            msgs = []
            for e in exc.errors():
                if e["loc"]:
                    field = str(e["loc"][0])
                    msgs.append(f"--{field.replace('_', '-')} / {cls.env_name(field)}: {e['msg']}")
                else:
                    msgs.append(str(e["msg"]).removeprefix("Value error, "))
            raise ValueError("; ".join(msgs)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The ``kubeinfer-router`` argument parser; every flag defaults to None (= env var or default)."""
    p = argparse.ArgumentParser(
        prog="kubeinfer-router",
        description="Model-, prefix- and load-aware HTTP proxy in front of kubeinfer serving pods. Every flag "
        "can also be set as KUBEINFER_ROUTER_<FLAG> (e.g. KUBEINFER_ROUTER_PORT).",
    )
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--endpoints", help="comma-separated serving-pod base URLs, e.g. http://10.0.0.1:8000,http://10.0.0.2:8000")
    p.add_argument("--kube-service", help="watch the EndpointSlices of this Kubernetes Service (instead of --endpoints)")
    p.add_argument("--kube-namespace", help="namespace of --kube-service (default: the pod's own)")
    p.add_argument("--isvc", help="the InferenceService's name (in messages)")
    p.add_argument("--load-factor", type=float, help="CHWBL bound: in-flight + 1 <= ceil(mean x factor) (default 1.25)")
    p.add_argument("--virtual-nodes", type=int, help="ring points per endpoint (default 256)")
    p.add_argument("--prefix-chars", type=int, help="prompt characters in the routing key (default 100)")
    p.add_argument("--affinity-ttl-seconds", type=float,
                   help="seconds an endpoint stays a routing key's holder without a request of it (default 300)")
    p.add_argument("--affinity-keys", type=int, help="most routing keys remembered (default 16384)")
    p.add_argument("--imbalance-min-requests", type=int,
                   help="the imbalance gate opens above this many in-flight requests on the busiest endpoint (default 64)")
    p.add_argument("--imbalance-ratio", type=float,
                   help="... and when the busiest has more than this times the least busy's (default 1.5)")
    p.add_argument("--poll-interval-seconds", type=float, help="seconds between polls of /kubeinfer/load (default 1)")
    p.add_argument("--hold-timeout-seconds", type=float,
                   help="longest a request waits for a usable endpoint, then 503 (default 60)")
    p.add_argument("--max-held-requests", type=int, help="most requests held at once; beyond it 503 (default 1000)")
    p.add_argument("--max-retries", type=int, help="most retries on another endpoint before the first byte (default 2)")
    p.add_argument("--eject-after-failures", type=int, help="consecutive failures that eject an endpoint (default 3)")
    p.add_argument("--eject-base-seconds", type=float, help="first ejection's length, doubling after (default 2)")
    p.add_argument("--eject-max-seconds", type=float, help="longest ejection (default 60)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body; beyond it 413 (default 16 MiB)")
    p.add_argument("--connect-timeout-seconds", type=float,
                   help="seconds to connect to an endpoint before it counts as failed (default 5)")
    p.add_argument("--timeout-graceful-shutdown", type=float,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    return p


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> RouterSettings:
    """Settings from ``argv`` (default ``sys.argv[1:]``) and ``env`` (default ``os.environ``).

    Raises:
        SystemExit: invalid flags or values (argparse prints the usage and the reason, exit code 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return RouterSettings.from_sources(vars(args), env)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
