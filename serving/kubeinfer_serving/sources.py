"""Model source URIs: the one parser shared by the serving pod's catalogue and the operator's spec.

Standard library only, so the operator image (which has no torch) can import it too.

Forms (DESIGN.md section 3):

* ``pvc://CLAIM/PATH``: a PersistentVolumeClaim mounted read-only at ``{pvc_root}/CLAIM``;
* ``file:///ABSOLUTE/PATH``: a directory inside the serving image;
* ``hf://ORG/NAME[@REVISION]``: a Hugging Face hub repository (branch, tag or commit; default ``main``),
  fetched at load time through ``HF_ENDPOINT``; ``hf://ORG/NAME/FILE.gguf[@REVISION]``: one GGUF
  file of a repository;
* ``s3://BUCKET/PREFIX``: every object under ``PREFIX/`` of an S3-compatible bucket, fetched at
  load time (endpoint, region and credentials from the environment); a ``PREFIX`` ending in
  ``.gguf`` is that one object, a GGUF file;
* ``builtin://NAME`` and a plain local path: serving catalogue only (the models shipped with the
  project, and local development).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_HF_PART = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_./]*$")
#: S3 bucket names (AWS "Bucket naming rules"): 3-63 chars of lowercase letters, digits, '.', '-'.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

#: Schemes whose weights come over the network into the pod's disk tier.
REMOTE_SCHEMES = ("hf", "s3")
#: Schemes an InferenceService may use (builtin:// and plain paths are for the serving pod alone).
CLUSTER_SCHEMES = ("pvc", "file", "hf", "s3")
SOURCE_FORMS = "pvc://CLAIM/PATH, file:///ABSOLUTE/PATH, hf://ORG/NAME[/FILE.gguf][@REVISION] or s3://BUCKET/PREFIX"
#: The suffix of a GGUF file (a single-file model; kubeinfer_serving.models.gguf).
GGUF_SUFFIX = ".gguf"


class SourceError(ValueError):
    """A source URI that does not match any of the forms above; the message says which form it broke."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed source URI.

    Attributes:
        uri: the text as written.
        scheme: ``pvc``, ``file``, ``hf``, ``s3``, ``builtin`` or ``path`` (a plain local path).
        claim: PersistentVolumeClaim name (``pvc``), else None.
        path: path inside the claim (``pvc``), absolute path (``file``), the path as written (``path``),
            ``ORG/NAME`` (``hf``), the key prefix without slashes at either end (``s3``, may be ""),
            or the built-in's name (``builtin``).
        bucket: the bucket (``s3``), else None.
        revision: branch, tag or commit of an ``hf`` repository (None: ``main``).
        file: the GGUF file inside an ``hf`` repository (``hf://ORG/NAME/FILE.gguf``), else None.
    """

    uri: str
    scheme: str
    path: str
    claim: str | None = None
    bucket: str | None = None
    revision: str | None = None
    file: str | None = None

    @property
    def remote(self) -> bool:
        """True when the weights must be fetched over the network (``hf``, ``s3``)."""
        return self.scheme in REMOTE_SCHEMES

    def local_path(self, pvc_root: str = "/mnt/models") -> str | None:
        """Where the serving pod reads a local source, or None for remote ones (fetched into the disk tier)."""
        if self.scheme == "pvc":
            return f"{pvc_root.rstrip('/')}/{self.claim}/{self.path}"
        if self.scheme in ("file", "path"):
            return self.path
        return None

    def remote_file(self) -> str | None:
        """The one file a remote source names (``hf://ORG/NAME/FILE.gguf``, ``s3://BUCKET/KEY.gguf``),
        as it lies in its fetched snapshot; None when the source is a whole directory or local."""
        if self.scheme == "hf":
            return self.file
        if self.scheme == "s3" and self.path.lower().endswith(GGUF_SUFFIX):
            return self.path.rsplit("/", 1)[-1]
        return None

    def cache_key(self) -> str:
        """A file-name-safe key naming this source's snapshot in the disk tier (same source, same key)."""
        if self.scheme == "hf":
            raw = f"hf--{self.path}--{self.revision or 'main'}" + (f"--{self.file}" if self.file else "")
        elif self.scheme == "s3":
            raw = f"s3--{self.bucket}--{self.path}"
        else:
            raw = f"{self.scheme}--{self.path}"
        return re.sub(r"[^A-Za-z0-9._-]+", "--", raw)


def parse_source(uri: str, *, allow_local: bool = True) -> ModelSource:
    """Parse a model ``source``.

    Args:
        uri: the source text.
        allow_local: also accept ``builtin://NAME`` and plain paths (the serving catalogue);
            the operator passes False.

    Raises:
        SourceError: an unknown scheme or a malformed claim, path, repository, revision or bucket.
    """
    if uri.startswith("pvc://"):
        claim, sep, path = uri[len("pvc://"):].partition("/")
        if not sep or not path or path.startswith("/"):
            raise SourceError(f"pvc source {uri!r} must be pvc://CLAIM/PATH")
        if len(claim) > 253 or not DNS1123_SUBDOMAIN.match(claim):
            raise SourceError(f"claim {claim!r} in {uri!r} is not a valid PersistentVolumeClaim name")
        if ".." in PurePosixPath(path).parts:
            raise SourceError(f"pvc source {uri!r} must not leave its claim with '..'")
        return ModelSource(uri, "pvc", path, claim=claim)
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        if not path.startswith("/") or path == "/" or path.startswith("//"):
            raise SourceError(f"file source {uri!r} must be file:///ABSOLUTE/PATH")
        return ModelSource(uri, "file", path)
    if uri.startswith("hf://"):
        repo, at, revision = uri[len("hf://"):].partition("@")
        parts = repo.split("/")
        file = None
        if len(parts) > 2 and parts[-1].lower().endswith(GGUF_SUFFIX):
            file, parts = "/".join(parts[2:]), parts[:2]
        if len(parts) != 2 or not all(_HF_PART.match(p) for p in parts + (file.split("/") if file else [])):
            raise SourceError(f"hf source {uri!r} must be hf://ORG/NAME[/FILE.gguf][@REVISION]")
        if at and (not _HF_REVISION.match(revision) or ".." in revision or len(revision) > 200):
            raise SourceError(f"revision {revision!r} in {uri!r} is not a branch, tag or commit name")
        return ModelSource(uri, "hf", "/".join(parts), revision=revision or None, file=file)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not _S3_BUCKET.match(bucket):
            raise SourceError(f"bucket {bucket!r} in {uri!r} is not a valid S3 bucket name")
        prefix = prefix.strip("/")
        if ".." in PurePosixPath(prefix).parts:
            raise SourceError(f"s3 source {uri!r} must not contain '..'")
        return ModelSource(uri, "s3", prefix, bucket=bucket)
    if allow_local and uri.startswith("builtin://"):
        name = uri[len("builtin://"):]
        if not name:
            raise SourceError(f"builtin source {uri!r} must be builtin://NAME")
        return ModelSource(uri, "builtin", name)
    if "://" in uri or not allow_local or not uri:
        forms = SOURCE_FORMS + (", builtin://NAME or a plain path" if allow_local else "")
        raise SourceError(f"source {uri!r} must be {forms}")
    return ModelSource(uri, "path", uri)
