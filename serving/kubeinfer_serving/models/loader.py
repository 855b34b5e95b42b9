"""Read a local Hugging Face model directory: config, tokenizer, safetensors weights.

Never touches the network: every transformers call passes ``local_files_only=True``.
Errors are :class:`ModelLoadError` (or its subclass :class:`UnsupportedModelError`) with a
message that names the offending path, so the registry can show it as a Failed reason.

Sources (DESIGN.md section 3): ``file:///abs/path`` and plain paths are local directories;
``pvc://CLAIM/PATH`` is the read-only volume the operator mounts at ``{pvc_root}/CLAIM``;
``hf://`` and ``s3://`` sources are fetched by the registry (registry/disk.py), not here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer

from kubeinfer_serving.sources import SourceError, parse_source

#: Architectures the engine's model runner implements (config.json ``architectures[0]``).
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}

#: Bytes per element of the safetensors dtype codes (safetensors format spec).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


class ModelLoadError(Exception):
    """A model directory cannot be loaded (missing or corrupt files, bad source)."""


class UnsupportedModelError(ModelLoadError):
    """The directory holds a model whose architecture the engine does not implement."""


def _require_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"model directory {p} does not exist or is not a directory")
    return p


def _read_config_json(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"no config.json in model directory {path}")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot parse {cfg_file}: {exc}") from exc


def load_hf_config(path: str | Path, *, architectures: set[str] | None = None):
    """Load ``config.json`` of a generative model with ``transformers.AutoConfig`` (local files only).

    Args:
        path: the model directory.
        architectures: accepted ``architectures[0]`` values; default :data:`SUPPORTED_ARCHITECTURES`.

    Returns:
        The ``transformers.PretrainedConfig`` (e.g. ``LlamaConfig``).

    Raises:
        ModelLoadError: the directory or its config.json is missing or unreadable.
        UnsupportedModelError: the architecture is not in ``architectures``.
    """
    p = _require_dir(path)
    raw = _read_config_json(p)
    allowed = SUPPORTED_ARCHITECTURES if architectures is None else architectures
    archs = raw.get("architectures") or []
    if not archs or archs[0] not in allowed:
        found = archs[0] if archs else f"none (model_type={raw.get('model_type')!r})"
        raise UnsupportedModelError(
            f"model in {p} has architecture {found}; supported: {', '.join(sorted(allowed))}"
        )
    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError variously
        raise ModelLoadError(f"cannot load config from {p}: {exc}") from exc


def load_tokenizer(path: str | Path):
    """Load the tokenizer of a model directory with ``transformers.AutoTokenizer`` (local files only).

    Raises:
        ModelLoadError: the directory is missing or holds no loadable tokenizer.
    """
    p = _require_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {p}: {exc}") from exc


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a model directory, in a stable order.

    With ``model.safetensors.index.json`` (sharded checkpoints) the shards it names, else
    every ``*.safetensors`` in the directory sorted by name.

    Raises:
        ModelLoadError: no weight files, an unreadable index, or a shard the index names is missing.
    """
    p = _require_dir(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot parse {index}: {exc}") from exc
        files = [p / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"weight shard {f} named in {index.name} is missing")
        return files
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weight files in {p}")
    return files


def _read_header(file: Path) -> dict[str, Any]:
    """Parse a safetensors header (8-byte little-endian length + JSON) without reading tensors."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds file size {size}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"corrupt safetensors file {file}: {exc}") from exc
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"corrupt safetensors file {file}: bad entry {name!r}") from exc
        if end > data_len:
            raise ModelLoadError(f"corrupt safetensors file {file}: tensor {name!r} ends past the file end (truncated?)")
    return header


def iter_safetensors(path: str | Path, *, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight of a model directory, one tensor at a time.

    Tensors keep their stored dtype and shape; they are created on ``device`` by
    ``safetensors.safe_open`` (memory-mapped on CPU).

    Raises:
        ModelLoadError: missing weight files, or a file that is truncated or not safetensors
        (the message names the file).
    """
    for file in safetensors_files(path):
        _read_header(file)  # validates offsets so truncation is reported before any tensor is used
        try:
            with safe_open(str(file), framework="pt", device=device) as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"corrupt safetensors file {file}: {exc}") from exc


def _tensor_sizes(path: str | Path) -> Iterator[tuple[str, int, int]]:
    """(name, numel, bytes per element) of every stored tensor, from the headers only."""
    for file in safetensors_files(path):
        for name, info in _read_header(file).items():
            if name == "__metadata__":
                continue
            dtype = info.get("dtype")
            if dtype not in _DTYPE_BYTES:
                raise ModelLoadError(f"unknown dtype {dtype!r} for tensor {name!r} in {file}")
            numel = 1
            for d in info.get("shape", []):
                numel *= int(d)
            yield name, numel, _DTYPE_BYTES[dtype]


def weights_nbytes(path: str | Path) -> int:
    """Total bytes of all weight tensors as stored (from safetensors headers; no tensor is read).

    Raises:
        ModelLoadError: as :func:`safetensors_files`, or a corrupt header / unknown dtype.
    """
    return sum(numel * size for _, numel, size in _tensor_sizes(path))


def weights_numel(path: str | Path) -> int:
    """Total number of weight elements (from safetensors headers); times a dtype's size gives the
    bytes the weights take once converted to that dtype.

    Raises:
        ModelLoadError: as :func:`weights_nbytes`.
    """
    return sum(numel for _, numel, _ in _tensor_sizes(path))


def resolve_source(source: str, *, pvc_root: str | Path = "/mnt/models") -> Path:
    """Map a catalogue ``source`` to a local directory path (not checked for existence).

    ``file:///abs/dir`` -> ``/abs/dir``; a plain path -> itself (``~`` expanded);
    ``pvc://CLAIM/PATH`` -> ``{pvc_root}/CLAIM/PATH``.

    Parsing is :func:`kubeinfer_serving.sources.parse_source` (one parser for the whole project).

    Raises:
        ModelLoadError: a remote (``hf://``, ``s3://``) or ``builtin://`` source, an unknown scheme,
        a relative file:// path, or a pvc:// source without a path or escaping its claim with ``..``.
    """
    try:
        src = parse_source(source)
    except SourceError as exc:
        raise ModelLoadError(str(exc)) from None
    if src.remote:
        raise ModelLoadError(f"{source} is remote: the registry fetches it into its disk tier; it has no local path")
    if src.scheme == "builtin":
        raise ModelLoadError(f"{source} names a built-in model; kubeinfer_serving.models.builtin locates it")
    if src.scheme == "path":
        return Path(source).expanduser()
    return Path(src.local_path(str(pvc_root)))
