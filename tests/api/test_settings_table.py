"""The settings table: vLLM's flag names take effect, no flag is prefix-matched, secrets are never echoed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from kubeinfer_serving.__main__ import build_provider
from kubeinfer_serving.api.tenancy import KeyStore
from kubeinfer_serving.cli import parse_settings
from kubeinfer_serving.config import ServerSettings, fallback
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.registry.catalogue import Catalogue, parse_catalogue
from kubeinfer_serving.registry.memory import device_memory_bytes

from tests.api.conftest import _free_port, stop_process, wait_ready

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-do-not-print-4242"
TEMPLATE = "{{ bos_token }}{% for m in messages %}[[{{ m['role'] }}]] {{ m['content'] }}\n{% endfor %}"


def _env() -> dict[str, str]:
    path = os.pathsep.join(str(ROOT / d) for d in ("serving", "operator", "router"))
    return dict(os.environ, PYTHONPATH=path + os.pathsep + str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubeinfer_serving", *argv], env=_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv", [
    ["--api-k", SECRET],                 # a prefix of --api-key / --api-keys / --api-keys-file
    ["--api-keys-f", SECRET],
    [f"--api={SECRET}"],
    ["--model", "builtin://tiny-llama", "--api-key-file", SECRET],
])
def test_no_flag_is_prefix_matched_and_the_value_is_not_echoed(argv: list[str]) -> None:
    out = _cli(*argv)
    assert out.returncode == 2
    assert "unrecognized flags: --api" in out.stderr
    assert SECRET not in out.stderr + out.stdout


def test_an_invalid_secret_is_reported_without_its_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--api-key", SECRET, "--port", "80000"], env={})
    err = capsys.readouterr().err
    assert "--port" in err and SECRET not in err
    assert SECRET not in repr(ServerSettings(api_keys=[SECRET]))


def test_version_prints_the_package_version() -> None:
    from kubeinfer_serving import __version__

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"kubeinfer-serve {__version__}"


def test_api_key_flag_and_variable_configure_the_keys() -> None:
    s = parse_settings(["--api-key", SECRET, "sk-second-key=team-a"], env={})
    store = KeyStore.load(None, env={}, api_keys=s.api_keys)
    assert store.lookup(SECRET) is not None and store.lookup("sk-second-key").tenant.name == "team-a"
    from_env = parse_settings([], env={"KUBEINFER_API_KEYS": f"{SECRET},sk-third-key"})
    assert KeyStore.load(None, env={}, api_keys=from_env.api_keys).lookup("sk-third-key") is not None


def test_the_engine_catalogue_and_settings_share_one_default_per_knob() -> None:
    catalogue = parse_catalogue({"models": [{"name": "m", "source": "/m"}]})
    engine = EngineConfig()
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests", "block_size",
                 "scheduling_policy", "enforce_eager", "max_lora_rank"):
        assert getattr(catalogue, name) == getattr(engine, name) == fallback(name), name
    assert catalogue.max_loras == fallback("max_loras")


def test_gpu_memory_utilization_sets_the_budget_and_replaces_a_catalogue_budget(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("memoryBudgetBytes: 1073741824\nmodels:\n  - {name: a, source: /a}\n")
    provider = build_provider(parse_settings(["--models-config", str(config), "--device", "cpu",
                                              "--gpu-memory-utilization", "0.25"], env={}))
    assert provider.budget_bytes == int(device_memory_bytes(torch.device("cpu")) * 0.25)
    with pytest.raises(ValueError, match="give one of them"):
        build_provider(parse_settings(["--gpu-memory-utilization", "0.5", "--memory-budget-bytes", "9999"], env={}))


def test_block_size_reaches_the_engine_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    """--block-size (vLLM's flag) is the engines' KV block size; the catalogue's blockSize likewise."""
    with pytest.raises(SystemExit):
        parse_settings(["--block-size", "24"], env={})
    settings = parse_settings(["--model", "builtin://tiny-llama", "--block-size", "32", "--device", "cpu",
                               "--max-model-len", "256", "--max-num-seqs", "2",
                               "--memory-budget-bytes", str(1 << 30)], env={})
    provider = build_provider(settings)
    assert provider.catalogue.block_size == 32

    async def engine_block_size() -> int:
        await provider.start()
        try:
            async with provider.acquire("tiny-llama") as model:
                return model.engine.engine.block_manager.block_size
        finally:
            await provider.shutdown()

    assert asyncio.run(engine_block_size()) == 32
    assert isinstance(parse_catalogue({"blockSize": 64, "models": [{"name": "m", "source": "/m"}]}), Catalogue)


@pytest.fixture(scope="module")
def vllm_flags_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m kubeinfer_serving`` started with vLLM's flag names only."""
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    port = _free_port()
    cmd = [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--port", str(port),
           "--model", "builtin://tiny-llama", "--served-model-name", "served-tiny", "--api-key", SECRET,
           "--gpu-memory-utilization", "0.3", "--max-model-len", "300", "--chat-template", str(template),
           "--tool-call-parser", "hermes", "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=_env())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc)
        yield base
    finally:
        stop_process(proc)


def test_vllm_flag_names_take_effect(vllm_flags_server: str) -> None:
    """--api-key guards the API, --served-model-name names the model, --max-model-len caps the context,
    --gpu-memory-utilization sets the budget and --chat-template renders chat prompts."""
    base = vllm_flags_server
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=SECRET, max_retries=0, timeout=60)
    [model] = client.models.list().data
    assert model.id == "served-tiny" and model.max_model_len == 300
    load = httpx.get(f"{base}/kubeinfer/load", headers={"Authorization": f"Bearer {SECRET}"}, timeout=10).json()
    assert load["memory"]["budget_bytes"] == int(device_memory_bytes(torch.device("cpu")) * 0.3)
    chat = client.chat.completions.create(model="served-tiny", max_tokens=1,
                                          messages=[{"role": "user", "content": "hello there"}])
    rendered = client.completions.create(model="served-tiny", max_tokens=1, prompt="[[user]] hello there\n")
    assert chat.usage.prompt_tokens == rendered.usage.prompt_tokens


def test_the_readme_flag_table_is_generated_from_the_settings_table() -> None:
    from kubeinfer_serving import settings_doc

    readme = settings_doc.README.read_text(encoding="utf-8")
    assert settings_doc.render(readme) == readme, "run python -m kubeinfer_serving.settings_doc"
    for name in ServerSettings.model_fields:
        assert f"`{ServerSettings.env_name(name)}`" in readme
