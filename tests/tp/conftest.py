"""Fixtures of the tensor-parallel tests: the built-in tiny Llama (4 heads, 2 KV heads) and a driver
that runs a workload through an engine, recording every step's shape and the logits it sampled from."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from kubeinfer_serving.engine.llm_engine import LLMEngine
from kubeinfer_serving.engine.sampling import SamplingParams


@pytest.fixture(scope="session")
def tiny_dir():
    """The built-in tiny Llama directory (built once per machine, then cached)."""
    from kubeinfer_serving.models.builtin import ensure_builtin_model

    return ensure_builtin_model()


@dataclass
class Run:
    """What :func:`run_workload` saw: outputs per request, each step's rows, the sampled logits, statistics."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list] = field(default_factory=dict)
    steps: list[list[tuple[int, int]]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    preemptions: int = 0
    prefix_hits: int = 0


def run_workload(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, scored_every: int = 0) -> Run:
    """Add every prompt (greedy, EOS ignored) and step until all finish.

    ``scored_every`` n > 0: every n-th request also asks for ``logprobs=3`` and ``prompt_logprobs=2``
    (collected in :attr:`Run.logprobs`: prompt positions, then output tokens).

    Records, per step, (tokens computed before, new tokens) of each scheduled sequence, and every
    [N, vocab] logits tensor rank 0's model returned (the rows sampled from).
    """
    run = Run()
    model = engine.model
    original = model.compute_logits

    def recording(hidden):
        out = original(hidden)
        run.logits.append(out.detach().clone())
        return out

    runner_run = engine.runner.run

    def recording_run(scheduled):
        run.steps.append([(s.num_computed_before, s.num_new_tokens) for s in scheduled])
        return runner_run(scheduled)

    model.compute_logits = recording
    engine.runner.run = recording_run
    try:
        for i, prompt in enumerate(prompts):
            scored = scored_every and i % scored_every == 1
            engine.add_request(f"r{i}", prompt, SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                logprobs=3 if scored else None, prompt_logprobs=2 if scored else None))
        while engine.has_unfinished_requests():
            outs, stats = engine.step_with_stats()
            run.preemptions += stats.num_preemptions
            run.prefix_hits += stats.prefix_hits
            for o in outs:
                run.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.prompt_logprobs:
                    run.logprobs.setdefault(o.request_id, []).extend(p for p in o.prompt_logprobs if p is not None)
                if o.new_logprobs:
                    run.logprobs.setdefault(o.request_id, []).extend(o.new_logprobs)
    finally:
        del model.compute_logits
        del engine.runner.run
    return run
