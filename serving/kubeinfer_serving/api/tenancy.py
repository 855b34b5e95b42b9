"""API keys and tenants: who is calling, and what share of the pod they get.

Keys come from a YAML/JSON file (``--api-keys-file`` / ``$KUBEINFER_API_KEYS_FILE``; the operator
mounts the Secret named by the InferenceService's ``spec.apiKeysSecret`` there) and/or from the
environment (``$KUBEINFER_API_KEYS``: ``KEY[=TENANT],...``; ``$KUBEINFER_ADMIN_API_KEYS``: ``KEY,...``).
The file, camelCase keys::

    tenants:                      # optional: limits per tenant (defaults: no caps, weight 1)
      - name: team-a
        weight: 2                 # share of the engine under contention (weighted fair admission)
        maxWaitingRequests: 64    # requests waiting for admission; beyond it 429
        tokensPerSecond: 5000     # prompt + completion tokens per second; beyond it 429 + Retry-After
        burstTokens: 20000        # token bucket size (default 10 s of tokensPerSecond)
        priority: 0               # default request priority (vLLM: lower runs first)
        minPriority: 0            # the lowest (most urgent) priority its requests may ask for
                                  # (default: its priority, so a tenant cannot jump other tenants' queues)
    keys:
      - key: sk-team-a-1          # the key itself ...
        tenant: team-a
      - sha256: 9f86d08...        # ... or its SHA-256 (hex), so the file need not hold the key
        tenant: ops
        admin: true               # may call /admin/*

Without any key configured the server is open (one tenant, ``default``), as before.
Tenant names become metric labels; their number is bounded by this file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

#: Environment variables read besides the file.
API_KEYS_ENV = "KUBEINFER_API_KEYS"
ADMIN_API_KEYS_ENV = "KUBEINFER_ADMIN_API_KEYS"
#: The tenant of requests when no keys are configured, and of env keys without ``=TENANT``.
DEFAULT_TENANT = "default"
#: The tenant of admin keys from ``$KUBEINFER_ADMIN_API_KEYS``.
ADMIN_TENANT = "admin"
_TENANT_NAME = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$"


class KeysFileError(ValueError):
    """The API keys file is unreadable or does not match the schema (the server refuses to start)."""


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TenantSpec(_Camel):
    """Limits of one tenant (see the module docstring); None means no cap."""

    name: str = Field(pattern=_TENANT_NAME)
    weight: float = Field(1.0, gt=0, le=1000)
    max_waiting_requests: int | None = Field(None, ge=1)
    tokens_per_second: float | None = Field(None, gt=0)
    burst_tokens: float | None = Field(None, gt=0)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    min_priority: int | None = Field(None, ge=-(2**31), le=2**31 - 1)

    @model_validator(mode="after")
    def _floor(self) -> TenantSpec:
        if self.min_priority is not None and self.min_priority > self.priority:
            raise ValueError("minPriority must not be above priority (the tenant's default must be allowed)")
        return self


class KeySpec(_Camel):
    """One API key: the key or its SHA-256, the tenant it maps to, whether it is an admin key."""

    key: str | None = Field(None, min_length=8)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    tenant: str = Field(DEFAULT_TENANT, pattern=_TENANT_NAME)
    admin: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> KeySpec:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of key and sha256")
        return self

    @property
    def digest(self) -> str:
        """SHA-256 hex of the key."""
        return self.sha256.lower() if self.sha256 else hash_key(self.key or "")


class KeysFile(_Camel):
    """The whole file."""

    tenants: list[TenantSpec] = Field(default_factory=list)
    keys: list[KeySpec] = Field(default_factory=list)


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key (keys are looked up by digest, never compared as strings)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """Who a request belongs to, with its limits (a resolved :class:`TenantSpec`)."""

    name: str
    weight: float = 1.0
    max_waiting_requests: int | None = None
    tokens_per_second: float | None = None
    burst_tokens: float | None = None
    priority: int = 0
    admin: bool = False
    min_priority: int | None = None

    @property
    def priority_floor(self) -> int:
        """The lowest ``priority`` value this tenant's requests may ask for (``minPriority``, else ``priority``)."""
        return self.priority if self.min_priority is None else self.min_priority


@dataclass(frozen=True)
class Identity:
    """The result of authenticating a request: its tenant, and whether the key may call /admin."""

    tenant: Tenant
    admin: bool


class KeyStore:
    """Digest -> identity map of the configured keys.

    Attributes:
        enabled: True when at least one key is configured (then every /v1 request needs one).
        tenants: every tenant by name (configured ones plus those only named by keys).
    """

    def __init__(self, keys: Mapping[str, Identity], tenants: Mapping[str, Tenant]) -> None:
        self._keys = dict(keys)
        self.tenants = dict(tenants)
        self.enabled = bool(self._keys)
        self.anonymous = Identity(self.tenants.get(DEFAULT_TENANT, Tenant(DEFAULT_TENANT)), admin=False)

    def lookup(self, key: str) -> Identity | None:
        """The identity of ``key``, or None when it is not a configured key."""
        return self._keys.get(hash_key(key))

    @classmethod
    def load(cls, path: Path | None = None, env: Mapping[str, str] | None = None,
             api_keys: Sequence[str] | None = None) -> KeyStore:
        """Read the keys file (when given) and the environment variables.

        Args:
            path: the keys file.
            env: the environment (default ``os.environ``).
            api_keys: ``KEY[=TENANT]`` entries (``--api-key``) used instead of ``$KUBEINFER_API_KEYS``.

        Raises:
            KeysFileError: unreadable file, bad schema, a key given twice, or an env entry without a key.
        """
        env = os.environ if env is None else env
        spec = KeysFile()
        if path is not None:
            try:
                raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
                spec = KeysFile.model_validate(raw)
            except OSError as exc:
                raise KeysFileError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from exc
            except (yaml.YAMLError, ValidationError) as exc:
                raise KeysFileError(f"invalid API keys file {path}: {exc}") from exc
        keys = list(spec.keys)
        entries = env.get(API_KEYS_ENV, "").split(",") if api_keys is None else api_keys
        for item in filter(None, (x.strip() for x in entries)):
            key, _, tenant = item.partition("=")
            keys.append(_env_key(key, tenant or DEFAULT_TENANT, admin=False))
        for item in filter(None, (x.strip() for x in env.get(ADMIN_API_KEYS_ENV, "").split(","))):
            keys.append(_env_key(item, ADMIN_TENANT, admin=True))
        tenants = {t.name: Tenant(t.name, t.weight, t.max_waiting_requests, t.tokens_per_second,
                                  t.burst_tokens, t.priority, min_priority=t.min_priority) for t in spec.tenants}
        by_digest: dict[str, Identity] = {}
        for k in keys:
            tenant = tenants.setdefault(k.tenant, Tenant(k.tenant))
            if k.digest in by_digest:
                raise KeysFileError(f"an API key of tenant {k.tenant!r} is configured twice")
            by_digest[k.digest] = Identity(tenant, k.admin)
        return cls(by_digest, tenants)


def _env_key(key: str, tenant: str, *, admin: bool) -> KeySpec:
    try:
        return KeySpec(key=key, tenant=tenant, admin=admin)
    except ValidationError as exc:
        raise KeysFileError(f"invalid API key entry in ${API_KEYS_ENV}/${ADMIN_API_KEYS_ENV} "
                            f"(keys need 8+ characters, tenants letters/digits/._-): {exc.errors()[0]['msg']}") from exc
