"""``kubeinfer-serve --tensor-parallel-size 2`` on CPU: a real uvicorn subprocess, the official
``openai`` client, the built-in tiny Llama split over two ranks (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine

from tests.api.conftest import _free_port, wait_ready

from .conftest import run_workload

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[300 + i, 301, 302 + 3 * i, 7, 7, 9, 40 + i] for i in range(6)]
MAX_TOKENS = 10


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _serve(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        str(REPO / d) for d in ("serving", "operator", "router")))
    cmd = [sys.executable, "-m", "kubeinfer_serving", "--host", "127.0.0.1", "--port", str(port),
           "--model", "builtin://tiny-llama", "--tensor-parallel-size", "2", "--device", "cpu",
           "--max-model-len", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, base


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serves_the_builtin_model_over_two_ranks_like_one_and_sigterm_stops_every_rank(tiny_dir, tmp_path):
    one = LLMEngine.from_model_dir(tiny_dir, model_name="tiny", config=EngineConfig(device="cpu", max_model_len=256))
    expected = run_workload(one, PROMPTS, MAX_TOKENS).tokens
    proc, base = _serve(tmp_path)
    try:
        workers = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) >= 1
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        for i, prompt in enumerate(PROMPTS):
            r = oai.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=1, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == MAX_TOKENS
            assert r.choices[0].text == one.tokenizer.decode(expected[f"r{i}"])
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)], "a rank outlived the server"
    finally:
        _stop(proc)


def test_a_dead_worker_shows_the_model_failed_and_health_503(tmp_path):
    proc, base = _serve(tmp_path)
    try:
        workers = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()
                   and "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/health", timeout=10).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 503 and "tiny-llama" in health.text
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        card = next(m.model_dump() for m in oai.models.list().data if m.id == "tiny-llama")
        assert card["state"] == "failed" and "rank 1" in card["message"], card
        with pytest.raises(openai.APIStatusError) as err:
            oai.completions.create(model="tiny-llama", prompt=[1, 2, 3], max_tokens=4)
        assert err.value.status_code == 503
    finally:
        _stop(proc)
