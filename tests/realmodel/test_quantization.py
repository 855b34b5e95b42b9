"""The int8 quality gate on SmolLM2: teacher-forced over a fixed English text of > 2,000 tokens.

For every position of the text, the engine with ``quantization="int8"`` and the unquantized one
(both CPU float32) give the log-probability of the text's next token and their top-1 token.
Gate: top-1 agreement >= 90 %; the mean absolute difference of the text tokens' log-probabilities
is reported (and bounded loosely, so a broken quantizer fails). Bytes: int8 at most half of the
unquantized model as the memory budget counts it, and the decoder layers at about a quarter of
their float32 bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.engine.sampling import SamplingParams
from kubeinfer_serving.models.build_tiny import CORPUS_PATH

#: Tokens per scored request (the engine's context is 1024).
CHUNK = 512


def _score(model_dir: Path, quantization: str, chunks: list[list[int]]) -> tuple[list[float], list[int], LLMEngine]:
    """Per scored position: the log-probability of the text's token and the model's top-1 token."""
    engine = LLMEngine.from_model_dir(model_dir, model_name=f"smollm2-{quantization}", config=EngineConfig(
        device="cpu", max_num_seqs=len(chunks), max_num_batched_tokens=1024, num_kv_blocks=64 * len(chunks),
        max_model_len=1024, quantization=quantization))
    for i, ids in enumerate(chunks):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=0, prompt_logprobs=1))
    scored: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                scored[out.request_id] = out.prompt_logprobs[1:]
    chosen, top1 = [], []
    for i in range(len(chunks)):
        for entry in scored[str(i)]:
            chosen.append(entry.logprob)
            top1.append(max(entry.top, key=lambda t: t[1])[0])
    return chosen, top1, engine


@pytest.fixture(scope="module")
def text_chunks(reference) -> list[list[int]]:
    ids = reference.tok.encode(CORPUS_PATH.read_text(encoding="utf-8"))
    assert len(ids) > 2000
    return [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK) if len(ids[i:i + CHUNK]) > 1]


def test_int8_agrees_with_the_unquantized_model_and_halves_the_bytes(smollm2_dir: Path, text_chunks) -> None:
    base_lp, base_top, base = _score(smollm2_dir, "none", text_chunks)
    base_params = sum(p.numel() * p.element_size() for p in base.model.parameters())
    base_layers = sum(p.numel() * p.element_size() for p in base.model.model.layers.parameters())
    base.release()
    q_lp, q_top, quant = _score(smollm2_dir, "int8", text_chunks)
    assert len(q_lp) == len(base_lp) >= 2000
    agreement = sum(a == b for a, b in zip(q_top, base_top, strict=True)) / len(base_top)
    mean_abs = sum(abs(a - b) for a, b in zip(q_lp, base_lp, strict=True)) / len(base_lp)
    report = {"positions": len(base_lp), "top1_agreement": round(agreement, 4),
              "mean_abs_dlogprob": round(mean_abs, 4), "weights_bytes_none_params": base_params,
              "weights_bytes_none_measured": base.weights_bytes, "weights_bytes_int8": quant.weights_bytes}
    if os.environ.get("KUBEINFER_QUALITY_REPORT"):
        Path(os.environ["KUBEINFER_QUALITY_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    quant_layers = sum(p.numel() * p.element_size() for p in quant.model.model.layers.parameters())
    quant.release()
    assert agreement >= 0.90, report
    assert mean_abs < 0.1, report
    # What the budget counts (on CPU float32 the unquantized projections also hold oneDNN-packed
    # copies; the int8 model keeps one for the tied lm_head), and the decoder layers alone.
    assert quant.weights_bytes * 2 <= base.weights_bytes, report
    assert quant_layers * 3.5 <= base_layers, report
