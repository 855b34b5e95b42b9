"""Fetching a remote model (``hf://``, ``s3://``) file by file into a staging directory.

A :class:`Fetcher` first lists what it will download (:meth:`Fetcher.listing`: the pinned
revision and every file with its size and, where the store publishes one, its checksum), so
the disk tier (:mod:`.disk`) can make room before a byte is written; then
:meth:`Fetcher.download` writes the files under a staging directory, and the disk tier checks
every size and checksum before it renames the directory into place.

Only weights, config and tokenizer files are fetched (:data:`ALLOW_PATTERNS`, the ``allow_patterns``
of ``huggingface_hub``), so a repository's ONNX/OpenVINO/PyTorch-pickle copies never fill the disk.

Credentials and endpoints come from the environment (the operator mounts the isvc's Secret as
env vars, DESIGN.md section 9): ``HF_ENDPOINT``, ``HF_TOKEN`` for the hub; ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` for S3 (the names of the AWS SDKs, so any
S3-compatible store works). A model whose catalogue entry has ``credentialsEnvPrefix: P`` reads
``P`` + each name first (its own Secret) and the plain name second (the pod-level Secret).
Secret values never appear in messages or logs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from kubeinfer_serving.sources import ModelSource

#: Files a model needs (weights, configs, tokenizer, chat template); fnmatch patterns on repo-relative paths.
ALLOW_PATTERNS = (
    "*.safetensors", "*.json", "*.jinja", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "*.tiktoken", "vocab.txt", "merges.txt",
)
#: Environment names a fetcher reads (with and without the model's ``credentialsEnvPrefix``).
CREDENTIAL_ENV = (
    "HF_ENDPOINT", "HF_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)


class FetchError(RuntimeError):
    """A remote model could not be fetched; the message is safe to show (no secrets) and says why."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a remote snapshot.

    Attributes:
        path: repository-relative path (``/``-separated), also its path under the snapshot directory.
        size: bytes.
        sha256: hex SHA-256 when the store publishes it (hub LFS files), else None.
        md5: hex MD5 when the store publishes it (S3 ETag of a single-part upload), else None.
        git_sha1: hex git blob id when the store publishes it (hub non-LFS files), else None.
    """

    path: str
    size: int
    sha256: str | None = None
    md5: str | None = None
    git_sha1: str | None = None

    def verify(self, local: Path) -> None:
        """Check ``local`` against the listed size and checksum.

        Raises:
            FetchError: missing file, wrong size (a partial download), or checksum mismatch (corrupt).
        """
        if not local.is_file():
            raise FetchError(f"{self.path}: not downloaded")
        size = local.stat().st_size
        if size != self.size:
            raise FetchError(f"{self.path}: got {size} bytes, the store lists {self.size} (partial download)")
        wanted = [(name, digest) for name, digest in
                  (("sha256", self.sha256), ("md5", self.md5), ("git-sha1", self.git_sha1)) if digest]
        if not wanted:
            return
        name, digest = wanted[0]
        h = hashlib.sha256() if name == "sha256" else hashlib.md5() if name == "md5" else hashlib.sha1()
        if name == "git-sha1":  # git's blob id: sha1 of "blob SIZE\0" + content
            h.update(f"blob {size}\0".encode())
        with local.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest.lower():
            raise FetchError(f"{self.path}: {name} {h.hexdigest()} does not match the store's {digest} (corrupt object)")


@dataclass(frozen=True)
class Listing:
    """What a fetch will download.

    Attributes:
        revision: the pinned revision (hub commit sha; for S3 the newest object's ETag-derived
            fingerprint of the listing), recorded in ``/v1/models``.
        files: every file, repository-relative.
    """

    revision: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes, bytes."""
        return sum(f.size for f in self.files)


class Fetcher(Protocol):
    """Lists and downloads one remote source."""

    source: ModelSource

    def listing(self) -> Listing:
        """The files to download. Blocking. Raises FetchError (not found, access denied, unreachable)."""

    def download(self, listing: Listing, dest: Path) -> None:
        """Write every listed file under ``dest``. Blocking. Raises FetchError."""


def _allowed(path: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(path, p) or fnmatch(path.rsplit("/", 1)[-1], p) for p in ALLOW_PATTERNS)


def credential_env(prefix: str | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The credential/endpoint variables for a model: ``prefix + NAME`` first, else ``NAME`` (empty = unset)."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for name in CREDENTIAL_ENV:
        value = (env.get(prefix + name) if prefix else None) or env.get(name)
        if value:
            out[name] = value
    return out


class HubFetcher:
    """``hf://ORG/NAME[@REVISION]`` through ``huggingface_hub`` (endpoint ``HF_ENDPOINT``, token ``HF_TOKEN``).

    Downloads with :func:`huggingface_hub.snapshot_download` at the pinned commit into the staging
    directory (``local_dir``), ``allow_patterns`` = :data:`ALLOW_PATTERNS`; for
    ``hf://ORG/NAME/FILE.gguf`` that one file.
    """

    def __init__(self, source: ModelSource, env: Mapping[str, str]) -> None:
        self.source = source
        self.endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.token = env.get("HF_TOKEN") or False  # False: never read a token file from the pod's home

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def _explain(self, exc: Exception) -> FetchError:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.source.uri} at {self.endpoint}"
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, RevisionNotFoundError):
            return FetchError(f"{where}: revision {self.source.revision!r} not found")
        if isinstance(exc, GatedRepoError) or status in (401, 403):
            return FetchError(f"{where}: access denied (HTTP {status}); check HF_TOKEN in the credentials Secret")
        if isinstance(exc, RepositoryNotFoundError):
            return FetchError(f"{where}: repository not found (or private: check HF_TOKEN in the credentials Secret)")
        if isinstance(exc, OfflineModeIsEnabled):
            return FetchError(f"{where}: HF_HUB_OFFLINE is set in the pod; set HF_HUB_OFFLINE=0 to fetch from the hub")
        if isinstance(exc, HfHubHTTPError):
            return FetchError(f"{where}: HTTP {status}: {exc}".splitlines()[0])
        return FetchError(f"{where}: {type(exc).__name__}: {exc}".splitlines()[0])

    def listing(self) -> Listing:
        """See :meth:`Fetcher.listing`: ``repo_info`` pins the commit, ``list_repo_tree`` lists the files."""
        from huggingface_hub.hf_api import RepoFile

        api = self._api()
        try:
            sha = api.repo_info(self.source.path, revision=self.source.revision).sha
            files = [
                RemoteFile(
                    f.path, int(f.size),
                    sha256=f.lfs.sha256 if f.lfs is not None else None,
                    git_sha1=f.blob_id if f.lfs is None else None,
                )
                for f in api.list_repo_tree(self.source.path, revision=sha, recursive=True)
                if isinstance(f, RepoFile) and (f.path == self.source.file if self.source.file else _allowed(f.path))
            ]
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - every hub/network error becomes one readable reason
            raise self._explain(exc) from None
        if self.source.file:
            if not files:
                raise FetchError(f"{self.source.uri}: the repository at {sha} has no file {self.source.file}")
        elif not any(f.path.endswith("config.json") for f in files):
            raise FetchError(f"{self.source.uri}: the repository at {sha} has no config.json")
        return Listing(str(sha), tuple(sorted(files, key=lambda f: f.path)))

    def download(self, listing: Listing, dest: Path) -> None:
        """See :meth:`Fetcher.download`."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # a server logs one line per fetch (disk.py), not terminal progress bars
        try:
            snapshot_download(
                self.source.path, revision=listing.revision, local_dir=dest, endpoint=self.endpoint,
                token=self.token, allow_patterns=[f.path for f in listing.files], max_workers=4,
            )
        except Exception as exc:  # noqa: BLE001
            raise self._explain(exc) from None


def _s3_endpoint(env: Mapping[str, str]) -> tuple[str, bool]:
    """(host[:port], secure) of the S3 endpoint; AWS's regional endpoint when none is set."""
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not url:
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        return (f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"), True
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise FetchError(f"S3 endpoint {url!r} must be http(s)://HOST[:PORT]")
    return parts.netloc, parts.scheme == "https"


class S3Fetcher:
    """``s3://BUCKET/PREFIX`` through the MinIO Python SDK (any S3-compatible store, signature v4).

    Lists every object under ``PREFIX/`` (a ``PREFIX`` ending in ``.gguf``: that one object, a GGUF
    file); single-part ETags (an MD5) are checked after download.
    """

    def __init__(self, source: ModelSource, env: Mapping[str, str]) -> None:
        self.source = source
        self.endpoint, secure = _s3_endpoint(env)
        from minio import Minio

        self.client = Minio(
            self.endpoint,
            access_key=env.get("AWS_ACCESS_KEY_ID"),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
            secure=secure,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        )

    @property
    def _prefix(self) -> str:
        """The key prefix the listed files' relative paths are under (a GGUF key's directory)."""
        if self.source.remote_file():
            return self.source.path[: -len(self.source.remote_file())]
        return self.source.path + "/" if self.source.path else ""

    def _explain(self, exc: Exception) -> FetchError:
        from minio.error import S3Error

        where = f"{self.source.uri} at {self.endpoint}"
        if isinstance(exc, S3Error):
            hints = {
                "InvalidAccessKeyId": "the access key is not known to the store; check AWS_ACCESS_KEY_ID in the "
                                      "credentials Secret",
                "SignatureDoesNotMatch": "the secret key is wrong; check AWS_SECRET_ACCESS_KEY in the credentials "
                                         "Secret",
                "AccessDenied": "access denied; check the credentials Secret and the bucket policy",
                "NoSuchBucket": "no such bucket",
                "NoSuchKey": "an object disappeared during the fetch",
            }
            return FetchError(f"{where}: {exc.code}: {hints.get(exc.code, exc.message)}")
        return FetchError(f"{where}: {type(exc).__name__}: {exc}".splitlines()[0])

    def listing(self) -> Listing:
        """See :meth:`Fetcher.listing`; the revision is a digest of the listed names, sizes and ETags."""
        try:
            objects = list(self.client.list_objects(self.source.bucket, prefix=self.source.path if
                                                    self.source.remote_file() else self._prefix, recursive=True))
        except Exception as exc:  # noqa: BLE001
            raise self._explain(exc) from None
        files = []
        digest = hashlib.sha256()
        for obj in sorted(objects, key=lambda o: o.object_name):
            rel = obj.object_name[len(self._prefix):]
            single = self.source.remote_file()
            if obj.is_dir or not rel or not (rel == single if single else _allowed(rel)):
                continue
            etag = (obj.etag or "").strip('"')
            md5 = etag.lower() if len(etag) == 32 and "-" not in etag else None
            files.append(RemoteFile(rel, int(obj.size), md5=md5))
            digest.update(f"{rel}\0{obj.size}\0{etag}\n".encode())
        if not files:
            raise FetchError(f"{self.source.uri} at {self.endpoint}: no model files under that prefix")
        if not self.source.remote_file() and not any(f.path.endswith("config.json") for f in files):
            raise FetchError(f"{self.source.uri} at {self.endpoint}: no config.json under that prefix")
        return Listing(digest.hexdigest()[:16], tuple(files))

    def download(self, listing: Listing, dest: Path) -> None:
        """See :meth:`Fetcher.download`."""
        for f in listing.files:
            target = dest / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.fget_object(self.source.bucket, self._prefix + f.path, str(target))
            except Exception as exc:  # noqa: BLE001
                raise self._explain(exc) from None


def make_fetcher(source: ModelSource, credentials_env_prefix: str | None = None,
                 env: Mapping[str, str] | None = None) -> Fetcher:
    """The fetcher of a remote ``source`` with its credentials from the environment.

    Raises:
        FetchError: ``source`` is not remote, or its endpoint setting is malformed.
    """
    creds = credential_env(credentials_env_prefix, env)
    if source.scheme == "hf":
        return HubFetcher(source, creds)
    if source.scheme == "s3":
        return S3Fetcher(source, creds)
    raise FetchError(f"{source.uri} is not a remote source")
