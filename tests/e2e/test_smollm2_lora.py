"""A real model and two LoRA fine-tunes of it on the real node: deploy/examples/05-smollm2-lora.yaml.

What a user notices, through the isvc's Service (the router pod in front of the one serving pod),
with the official ``openai`` client:

- SmolLM2-135M-Instruct (baked into the serving image) answers "What is the capital of France?"
  with Paris (greedy): the real tokenizer, chat template and weights made it into the pod intact.
- Each adapter, named as the request's ``model``, answers exactly as PEFT's merged model of the
  same adapter does on this machine (greedy, token for token), the two adapters answer
  differently from each other and from the base, and all three run at once (mixed batches).
- The serving pod's own ``/v1/models`` lists both adapters with ``parent`` = the base, loaded.

The adapters are made here with PEFT on the same SmolLM2 directory (fixed seeds, non-zero B),
uploaded to S3Proxy on this machine (listening on the node bridge's gateway address) behind a
selector-less Service ``adapter-store`` in the test's namespace, and fetched by the pod at load
time with the isvc's credentials Secret. The test cluster has no cluster DNS, so the only change
to the example is the Secret's endpoint: the Service's ClusterIP instead of its name.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from kubeinfer_serving.models.builtin import BUILTIN_CHAT_MODEL_NAME, builtin_model_dir
from openai import OpenAI

from tests.cluster_fixture import REPO
from tests.e2e.conftest import OPERATOR_IMAGE, SERVING_IMAGE, E2ECluster
from tests.lora.peft_adapters import ALL_TARGETS, AdapterSpec, greedy, make_adapter, merged_model
from tests.remote_stores import S3Server

pytestmark = pytest.mark.timeout(1200)

NS = "smollm2-e2e"
RELEASE = "kubeinfer-smollm2"
RELEASE_NS = "kubeinfer-smollm2-system"
EXAMPLE = REPO / "deploy" / "examples" / "05-smollm2-lora.yaml"
NAME = "smollm2-lora"
BASE = BUILTIN_CHAT_MODEL_NAME
#: Example adapter name -> how this test makes it with PEFT (seed, rank, alpha, targets).
ADAPTERS = {
    "smollm2-vo": AdapterSpec("vo-r8", seed=1, r=8, alpha=32, targets=("v_proj", "o_proj")),
    "smollm2-all": AdapterSpec("all-r4", seed=2, r=4, alpha=8, targets=ALL_TARGETS),
}
QUESTION = "What is the capital of France?"
#: Greedy tokens compared with PEFT per adapter (EOS ignored, so every answer has this length).
ADAPTER_TOKENS = 16
SERVING_SELECTOR = f"serving.kubeinfer.io/inferenceservice={NAME},app.kubernetes.io/component=serving"


@dataclass
class Deployed:
    """The installed example: the cluster, an ``openai`` client on the isvc's Service, the adapters' directories."""

    e2e: E2ECluster
    api: OpenAI
    adapter_dirs: dict[str, Path]


def chat_prompt_ids(model_dir: Path, question: str) -> list[int]:
    """Token ids of ``question`` as one user turn under SmolLM2's chat template (generation prompt added)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"])


@pytest.fixture(scope="module")
def deployed(e2e_cluster: E2ECluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """The chart installed for namespace ``smollm2-e2e``, the adapters in S3, and example 05 Ready there."""
    e2e = e2e_cluster
    work = tmp_path_factory.mktemp("smollm2-lora")
    model_dir = builtin_model_dir(BASE)
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    secret = next(d for d in docs if d["kind"] == "Secret")
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    assert isvc["metadata"]["name"] == NAME
    sources = {a["name"]: a["source"] for a in isvc["spec"]["models"][0]["adapters"]}
    assert sources.keys() == ADAPTERS.keys()

    gateway = e2e.gateway
    creds = secret["stringData"]
    store = S3Server(work / "s3", host=gateway, access_key=creds["AWS_ACCESS_KEY_ID"],
                     secret_key=creds["AWS_SECRET_ACCESS_KEY"]).start()
    e2e.kubectl("create", "namespace", NS, check=False)
    try:
        adapter_dirs = {}
        for name, spec in ADAPTERS.items():
            adapter_dirs[name] = make_adapter(model_dir, spec, work / "adapters" / name)
            bucket, prefix = sources[name].removeprefix("s3://").split("/", 1)
            assert store.upload_dir(bucket, prefix, adapter_dirs[name]) > 0
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "adapter-store", "namespace": NS},
                   "spec": {"ports": [{"name": "http", "port": 80, "targetPort": store.port}]}}
        endpoints = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "adapter-store", "namespace": NS},
                     "subsets": [{"addresses": [{"ip": gateway}], "ports": [{"name": "http", "port": store.port}]}]}
        e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([service, endpoints]))
        creds["AWS_ENDPOINT_URL"] = f"http://{e2e.get('service', 'adapter-store', '-n', NS)['spec']['clusterIP']}"

        repo, tag = OPERATOR_IMAGE.rsplit(":", 1)
        e2e.helm("install", RELEASE, str(REPO / "deploy" / "helm" / "kubeinfer"), "--namespace", RELEASE_NS,
                 "--create-namespace", "--wait", "--timeout", "300s", "--set", f"image.repository={repo}",
                 "--set", f"image.tag={tag}", "--set", f"servingImage={SERVING_IMAGE}",
                 "--set", f"watchNamespaces={{{NS}}}", timeout=400)
        e2e.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump_all([secret, isvc]))
        e2e.kubectl("wait", "--for=condition=Ready", f"isvc/{NAME}", "-n", NS, "--timeout=600s", timeout=620)
        ip = e2e.get("service", NAME, "-n", NS)["spec"]["clusterIP"]
        yield Deployed(e2e, OpenAI(base_url=f"http://{ip}/v1", api_key="unused", timeout=300, max_retries=0),
                       adapter_dirs)
    finally:
        e2e.kubectl("-n", NS, "delete", "isvc", "--all", "--wait=true", timeout=300, check=False)
        e2e.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", timeout=300, check=False)
        # Not waited for: the namespace's last objects go in the background (the cluster is the session's).
        e2e.kubectl("delete", "namespace", NS, "--wait=false", timeout=60, check=False)
        e2e.kubectl("delete", "namespace", RELEASE_NS, "--wait=false", timeout=60, check=False)
        store.stop()


def test_smollm2_answers_a_known_question_through_the_service(deployed: Deployed):
    out = deployed.api.chat.completions.create(model=BASE, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=60, temperature=0)
    assert "Paris" in out.choices[0].message.content, out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"  # ended at <|im_end|>, not at max_tokens


def test_the_serving_pod_lists_both_adapters_on_their_base(deployed: Deployed):
    e2e = deployed.e2e
    pods = [p for p in e2e.get("pods", "-n", NS, "-l", SERVING_SELECTOR)["items"]
            if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1
    cards = {c["id"]: c for c in httpx.get(f"http://{pods[0]['status']['podIP']}:8000/v1/models",
                                           timeout=30).json()["data"]}
    assert cards[BASE]["parent"] is None and cards[BASE]["state"] == "loaded"
    for name in ADAPTERS:
        assert cards[name]["parent"] == BASE and cards[name]["state"] == "loaded", cards[name]
        assert cards[name]["bytes"] > 0
    assert {BASE, *ADAPTERS} <= {m.id for m in deployed.api.models.list().data}  # and through the Service


def test_each_adapter_answers_as_peft_does_in_mixed_batches(deployed: Deployed):
    model_dir = builtin_model_dir(BASE)
    prompt = chat_prompt_ids(model_dir, QUESTION)
    want = {name: greedy(merged_model(model_dir, path), prompt, ADAPTER_TOKENS)
            for name, path in deployed.adapter_dirs.items()}
    want[BASE] = greedy(merged_model(model_dir, None), prompt, ADAPTER_TOKENS)

    def served(model: str) -> list[int]:
        out = deployed.api.completions.create(
            model=model, prompt=prompt, max_tokens=ADAPTER_TOKENS, temperature=0, logprobs=1,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        return [int(t.split(":", 1)[1]) for t in out.choices[0].logprobs.tokens]

    # The base and both adapters at once, twice over: the pod batches them together.
    order = [BASE, *ADAPTERS, *ADAPTERS, BASE]
    with ThreadPoolExecutor(len(order)) as pool:
        got = list(pool.map(served, order))
    for model, ids in zip(order, got, strict=True):
        assert ids == want[model], (model, ids, want[model])
    assert len({tuple(want[m]) for m in (BASE, *ADAPTERS)}) == 3, want  # the adapters change the answer
