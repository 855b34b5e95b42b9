"""hf:// and s3:// models: fetched from real stores on loopback into the bounded disk tier, then served.

S3: S3Proxy (tests/s3/install.sh), a real S3-compatible server that stores the uploaded objects
and checks signatures. Hub: :class:`tests.remote_stores.HubServer` in the hub's HTTP layout,
reached by huggingface_hub through HF_ENDPOINT.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import uvicorn
from kubeinfer_serving import metrics
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.models.builtin import builtin_embedding_model_dir
from kubeinfer_serving.registry import Catalogue, ModelEntry, ModelRegistry
from kubeinfer_serving.registry.protocol import ModelKind, ModelState, ModelUnavailableError
from openai import OpenAI

from tests.remote_stores import HubServer, S3Server, copy_model, free_port

BUCKET = "models"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]):
    """S3Proxy with tiny-0..tiny-2 uploaded under models/tiny-N and a corrupt copy under models/broken."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "data").start()
    try:
        for name, path in model_dirs.items():
            server.upload_dir(BUCKET, name, path)
        yield server
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture()
def hub(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A hub endpoint serving tiny-0 as kubeinfer/tiny-0 (plus a README and ONNX file that must not be fetched)."""
    repo = copy_model(model_dirs["tiny-0"], tmp_path / "repo")
    (repo / "README.md").write_text("# tiny\n")
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"\0" * 4096)
    server = HubServer().start()
    server.add_repo("kubeinfer/tiny-0", repo)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets it for the rest
    try:
        yield server
    finally:
        server.stop()


def _catalogue(tmp_path: Path, models: list[ModelEntry], **kw) -> Catalogue:
    return Catalogue(models=models, diskCacheDir=str(tmp_path / "disk"), **kw)


def _entry(name: str, source: str, **kw) -> ModelEntry:
    return ModelEntry(name=name, source=source, kvCacheBytes=2 << 20, **kw)


async def _greedy(reg: ModelRegistry, name: str) -> list[int]:
    from kubeinfer_serving.engine.sampling import SamplingParams

    async with reg.acquire(name) as served:
        ids = served.tokenizer.encode("The harbour was")
        tokens: list[int] = []
        async for out in served.engine.generate(f"{name}-{time.monotonic_ns()}", ids,
                                                SamplingParams(max_tokens=6, temperature=0.0)):
            tokens += out.new_token_ids
        return tokens


def _model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def test_s3_model_fetches_loads_serves_and_reloads_from_disk(s3_env, model_dirs, tmp_path) -> None:
    local = ModelRegistry(_catalogue(tmp_path, [_entry("local", f"file://{model_dirs['tiny-0']}")]), device="cpu")
    reg = ModelRegistry(_catalogue(tmp_path, [_entry("remote", f"s3://{BUCKET}/tiny-0")]), device="cpu")
    try:
        expected = await _greedy(local, "local")
        assert await _greedy(reg, "remote") == expected
        info = reg.list_models()[0]
        assert info.state is ModelState.LOADED and info.source == f"s3://{BUCKET}/tiny-0" and info.revision
        disk = reg.loader.disk
        assert (disk.misses, disk.hits) == (1, 0)
        snap = disk.snapshots()[0]
        assert snap.bytes == _model_bytes(model_dirs["tiny-0"])
        assert not [p for p in (tmp_path / "disk").iterdir() if p.name.startswith(".partial-")]

        await reg.unload("remote")
        assert await _greedy(reg, "remote") == expected
        assert (disk.misses, disk.hits) == (1, 1)
        assert [e.disk for e in reg.events if e.action == "cold_load"] == ["miss", "hit"]
        assert reg.list_models()[0].revision == info.revision
    finally:
        await reg.shutdown()
        await local.shutdown()


async def test_concurrent_loads_of_one_source_fetch_once(s3_env, tmp_path) -> None:
    source = f"s3://{BUCKET}/tiny-1"
    reg = ModelRegistry(_catalogue(tmp_path, [_entry("a", source), _entry("b", source)]), device="cpu")
    try:
        before = metrics.MODEL_FETCH_BYTES.labels(model="a")._value.get() + \
            metrics.MODEL_FETCH_BYTES.labels(model="b")._value.get()
        await asyncio.gather(reg.load("a"), reg.load("b"))
        disk = reg.loader.disk
        assert (disk.misses, disk.hits) == (1, 1)
        after = metrics.MODEL_FETCH_BYTES.labels(model="a")._value.get() + \
            metrics.MODEL_FETCH_BYTES.labels(model="b")._value.get()
        assert after - before == disk.snapshots()[0].bytes
    finally:
        await reg.shutdown()


async def test_disk_budget_evicts_lru_and_cycling_hits_disk(s3_env, model_dirs, tmp_path) -> None:
    """Three models, memory for one: with disk for two, the LRU snapshot goes; with disk for all, later rounds hit."""
    size = max(_model_bytes(p) for p in model_dirs.values())
    names = list(model_dirs)
    tight = ModelRegistry(_catalogue(tmp_path / "tight", [_entry(n, f"s3://{BUCKET}/{n}") for n in names],
                                     maxLoadedModels=1, diskCacheBytes=2 * size + size // 2), device="cpu")
    try:
        for n in names:
            await tight.load(n)
            disk = tight.loader.disk
            assert disk.used_bytes() <= disk.budget_bytes
        kept = {s.source for s in disk.snapshots()}
        assert kept == {f"s3://{BUCKET}/tiny-1", f"s3://{BUCKET}/tiny-2"}  # tiny-0 was least recently used
        assert len([p for p in (tmp_path / "tight" / "disk").iterdir()]) == 2
        await tight.load("tiny-0")  # fetched again, evicting tiny-1 (tiny-2 is not loaded either, but newer)
        assert {s.source for s in disk.snapshots()} == {f"s3://{BUCKET}/tiny-2", f"s3://{BUCKET}/tiny-0"}
        assert disk.misses == 4
    finally:
        await tight.shutdown()

    roomy = ModelRegistry(_catalogue(tmp_path / "roomy", [_entry(n, f"s3://{BUCKET}/{n}") for n in names],
                                     maxLoadedModels=1, diskCacheBytes=4 * size), device="cpu")
    try:
        rounds = 3
        for _ in range(rounds):
            for n in names:
                await roomy.load(n)
        disk = roomy.loader.disk
        assert (disk.misses, disk.hits) == (3, 3 * (rounds - 1))
        print(f"disk-tier hit ratio over {rounds} rounds of {len(names)} models, memory for 1: "
              f"{disk.hits / (disk.hits + disk.misses):.3f}")
    finally:
        await roomy.shutdown()


async def test_hub_model_over_http_records_revision_and_fetches_only_model_files(hub, model_dirs, tmp_path) -> None:
    reg = ModelRegistry(_catalogue(tmp_path, [_entry("hubbed", "hf://kubeinfer/tiny-0", preload=True),
                                              _entry("local", f"file://{model_dirs['tiny-0']}")]), device="cpu")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(reg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        deadline = time.monotonic() + 120
        while not (server.started and reg.is_ready()):
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        cards = {m.id: m for m in client.models.list().data}
        assert cards["hubbed"].state == "loaded"
        assert cards["hubbed"].revision == hub.repos["kubeinfer/tiny-0"].sha
        texts = [client.completions.create(model=m, prompt="The harbour was", max_tokens=6, temperature=0)
                 .choices[0].text for m in ("hubbed", "local")]
        assert texts[0] == texts[1]
        fetched = {p.rsplit("/", 1)[-1] for p in hub.requests if "/resolve/" in p}
        assert "model.safetensors" in fetched and "config.json" in fetched
        assert not fetched & {"README.md", "model.onnx"}
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
async def test_corrupt_or_partial_object_fails_that_model_only(hub, model_dirs, tmp_path, damage) -> None:
    bad = hub.add_repo("kubeinfer/broken", model_dirs["tiny-1"])
    getattr(bad, damage).add("model.safetensors")
    reg = ModelRegistry(_catalogue(tmp_path, [_entry("broken", "hf://kubeinfer/broken", preload=True),
                                              _entry("good", "hf://kubeinfer/tiny-0", preload=True)]), device="cpu")
    try:
        await reg.start()
        assert reg.is_ready()  # the failed preload does not hold the pod back
        states = {i.name: i for i in reg.list_models()}
        assert states["good"].state is ModelState.LOADED
        assert states["broken"].state is ModelState.FAILED
        assert "model.safetensors" in states["broken"].message
        with pytest.raises(ModelUnavailableError, match="failed to load"):
            async with reg.acquire("broken"):
                pass
        assert await _greedy(reg, "good")
        disk_dir = tmp_path / "disk"
        assert sorted(p.name for p in disk_dir.iterdir()) == [reg.loader.disk.snapshots()[0].key]
    finally:
        await reg.shutdown()


async def test_wrong_s3_credentials_give_a_clear_reason(s3, monkeypatch, tmp_path) -> None:
    for k, v in s3.env(secret_key="not-the-secret").items():
        monkeypatch.setenv(k, v)
    reg = ModelRegistry(_catalogue(tmp_path, [_entry("m", f"s3://{BUCKET}/tiny-0")]), device="cpu")
    try:
        with pytest.raises(ModelUnavailableError):
            await reg.load("m")
        info = reg.list_models()[0]
        assert info.state is ModelState.FAILED
        assert "SignatureDoesNotMatch" in info.message and "AWS_SECRET_ACCESS_KEY" in info.message
        assert "not-the-secret" not in info.message
    finally:
        await reg.shutdown()


async def test_per_model_credentials_prefix_wins_over_pod_level(s3, monkeypatch, tmp_path) -> None:
    for k, v in s3.env(access_key="nobody").items():
        monkeypatch.setenv(k, v)  # pod-level Secret: wrong key
    monkeypatch.setenv("KUBEINFER_SECRET_0_AWS_ACCESS_KEY_ID", s3.env()["AWS_ACCESS_KEY_ID"])
    entries = [_entry("own", f"s3://{BUCKET}/tiny-0", credentialsEnvPrefix="KUBEINFER_SECRET_0_"),
               _entry("pod", f"s3://{BUCKET}/tiny-1")]
    reg = ModelRegistry(_catalogue(tmp_path, entries), device="cpu")
    try:
        await reg.load("own")
        with pytest.raises(ModelUnavailableError, match="InvalidAccessKeyId"):
            await reg.load("pod")
    finally:
        await reg.shutdown()


async def test_wrong_hub_token_gives_a_clear_reason(hub, monkeypatch, tmp_path) -> None:
    hub.token = "hf_right"
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    reg = ModelRegistry(_catalogue(tmp_path, [_entry("m", "hf://kubeinfer/tiny-0")]), device="cpu")
    try:
        with pytest.raises(ModelUnavailableError):
            await reg.load("m")
        info = reg.list_models()[0]
        assert info.state is ModelState.FAILED and "HF_TOKEN" in info.message and "401" in info.message
        assert "hf_wrong_token_value" not in info.message
        monkeypatch.setenv("HF_TOKEN", "hf_right")
        await reg.load("m")  # an explicit load retries the Failed model
        assert reg.list_models()[0].state is ModelState.LOADED
    finally:
        await reg.shutdown()


async def test_embedding_model_from_s3_matches_the_local_one(s3_env, tmp_path) -> None:
    src = builtin_embedding_model_dir()
    s3_env.upload_dir(BUCKET, "all-minilm-l6-v2", src)
    entries = [ModelEntry(name="remote", source=f"s3://{BUCKET}/all-minilm-l6-v2", kind=ModelKind.EMBED),
               ModelEntry(name="local", source=f"file://{src}", kind=ModelKind.EMBED)]
    reg = ModelRegistry(_catalogue(tmp_path, entries), device="cpu")
    try:
        vecs = []
        for name in ("remote", "local"):
            async with reg.acquire(name) as served:
                v, _ = await served.embedder.embed(["a river in spring"])
                vecs.append(v)
        assert (vecs[0] == vecs[1]).all()
        files = {p.relative_to(reg.loader.disk.snapshots()[0].path).as_posix()
                 for p in reg.loader.disk.snapshots()[0].path.rglob("*") if p.is_file()}
        assert "1_Pooling/config.json" in files and "README.md" not in files
    finally:
        await reg.shutdown()


async def test_load_from_the_warm_tier_skips_the_disk_tier(s3_env, model_dirs, tmp_path) -> None:
    reg = ModelRegistry(_catalogue(tmp_path, [_entry("m", f"s3://{BUCKET}/tiny-2")], warmCacheBytes=1 << 30),
                        device="cpu")
    try:
        await reg.load("m")
        await reg.unload("m")  # weights go to host RAM
        disk = reg.loader.disk
        key = disk.snapshots()[0].key
        s3_env.client().remove_object(BUCKET, "tiny-2/config.json")  # the store could not serve it again
        await reg.load("m")
        assert [e.action for e in reg.events if e.action.endswith("_load")] == ["cold_load", "warm_load"]
        assert (disk.misses, disk.hits) == (1, 0)
        assert disk.pinned(key) == 1  # loaded from RAM, its disk snapshot is still kept
    finally:
        s3_env.client().fput_object(BUCKET, "tiny-2/config.json", str(model_dirs["tiny-2"] / "config.json"))
        await reg.shutdown()
