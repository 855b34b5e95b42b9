"""Fixtures of the engine tests: the built-in tiny Llama, Hugging Face reference outputs, a workload."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.engine.sampling import SamplingParams


@dataclass
class Req:
    """One workload request: id, prompt ids, output length, and the engine step it arrives at."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    arrive_step: int


@pytest.fixture(scope="session")
def tiny_dir():
    """The built-in tiny Llama directory (built once per machine, then cached)."""
    from kubeinfer_serving.models.builtin import ensure_builtin_model

    return ensure_builtin_model()


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(hf_config, weights dict, tokenizer) of the tiny model, loaded once."""
    from kubeinfer_serving.models import loader

    return (loader.load_hf_config(tiny_dir), dict(loader.iter_safetensors(tiny_dir)), loader.load_tokenizer(tiny_dir))


@pytest.fixture(scope="session")
def make_engine(tiny):
    """Factory: an LLMEngine on CPU over the tiny model with the given EngineConfig fields,
    recording into the Prometheus metrics (model label "tiny-test") as the serving pod does."""
    from kubeinfer_serving.metrics import EngineMetrics

    hf_config, weights, tokenizer = tiny

    def make(**kwargs) -> LLMEngine:
        kwargs.setdefault("device", "cpu")
        engine = LLMEngine.from_weights(hf_config, weights.items(), tokenizer=tokenizer,
                                        config=EngineConfig(**kwargs), model_name="tiny-test")
        engine.add_stat_logger(EngineMetrics("tiny-test"))
        return engine

    return make


@pytest.fixture(scope="session")
def hf_greedy(tiny_dir):
    """Function (prompt ids, n) -> the n greedy tokens of Hugging Face ``generate`` (EOS off), memoised."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def run(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=n, do_sample=False)
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return run


@pytest.fixture(scope="session")
def workload() -> list[Req]:
    """36 requests, prompts 1-150 tokens, outputs 1-40 tokens, arriving over the first 40 steps."""
    rng = random.Random(1234)
    reqs = []
    for i in range(36):
        plen = rng.choice([1, 2, 5, 9, 17, 31, 48, 64, 80, 100, 130, 150])
        prompt = [rng.randrange(6, 8192) for _ in range(plen)]
        reqs.append(Req(f"req-{i}", prompt, rng.randint(1, 40), rng.randint(0, 40)))
    return reqs


def run_workload(engine: LLMEngine, reqs: list[Req], params=None, on_step=None) -> dict[str, list]:
    """Feed ``reqs`` at their arrival steps, step until done.

    Returns:
        request id -> list of its RequestOutputs in order.
    """
    pending = sorted(reqs, key=lambda r: r.arrive_step)
    outs: dict[str, list] = {r.request_id: [] for r in reqs}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].arrive_step <= step:
            r = pending.pop(0)
            p = params(r) if params else SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(r.request_id, r.prompt, p)
        results = engine.step()
        for o in results:
            outs[o.request_id].append(o)
        if on_step:
            on_step(engine, results)
        step += 1
        assert step < 10_000, "engine made no progress"
    return outs


def tokens_of(outputs: list) -> list[int]:
    """All token ids of one request's outputs, concatenated."""
    return [t for o in outputs for t in o.new_token_ids]


from tests.triton_fixture import triton_device  # noqa: E402, F401
