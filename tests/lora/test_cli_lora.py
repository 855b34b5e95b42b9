"""vLLM's LoRA flags on ``kubeinfer-serve`` (single-model mode), as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import _free_port, stop_process, wait_ready
from tests.lora.peft_adapters import greedy

REPO = Path(__file__).resolve().parents[2]
PROMPT = [300, 301, 302, 7, 7, 9]


def test_lora_modules_flags_serve_adapters_by_name(tiny_dir, adapter_dirs, peft_models, tiny, tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        str(REPO / d) for d in ("serving", "operator", "router")))
    cmd = [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--port", str(port),
           "--model-dir", str(tiny_dir), "--served-model-name", "tiny", "--device", "cpu", "--max-model-len", "256",
           "--max-loras", "1", "--max-lora-rank", "8", "--log-level", "warning",
           "--lora-modules", f"qv={adapter_dirs['qv-r8']}", f"big={adapter_dirs['mlp-o-r16-rslora'].as_uri()}"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc)
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        cards = {m.id: m.model_dump() for m in oai.models.list().data}
        assert cards["qv"]["parent"] == "tiny" and cards["qv"]["state"] == "loaded"
        assert cards["big"]["state"] == "failed" and "exceeds maxLoraRank 8" in cards["big"]["message"]
        r = oai.completions.create(model="qv", prompt=PROMPT, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert r.choices[0].text == tiny[2].decode(greedy(peft_models("qv-r8"), PROMPT, 6))
        with pytest.raises(openai.APIStatusError) as err:
            oai.completions.create(model="big", prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 503
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
    finally:
        stop_process(proc)


def test_lora_flags_parse_and_belong_to_their_mode(tmp_path):
    from kubeinfer_serving.__main__ import build_provider
    from kubeinfer_serving.config import parse_settings

    settings = parse_settings(["--model-dir", str(tmp_path), "--enable-lora", "--max-loras", "3"],
                              env={"KUBEINFER_LORA_MODULES": "a=s3://bucket-a/x, b=rel/dir"})
    assert settings.lora_adapters() == [{"name": "a", "source": "s3://bucket-a/x"},
                                        {"name": "b", "source": str(Path("rel/dir").resolve())}]
    cat = build_provider(settings).catalogue
    assert [a.name for a in cat.models[0].adapters] == ["a", "b"] and cat.enable_lora and cat.max_loras == 3
    with pytest.raises(ValueError, match="--lora-modules needs --model "):
        build_provider(parse_settings(["--lora-modules", "a=/x"], env={}))
    with pytest.raises(SystemExit):
        parse_settings(["--model-dir", str(tmp_path), "--lora-modules", "no-equals-sign"], env={})
