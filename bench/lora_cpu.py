"""Multi-LoRA batching on CPU: output tokens/s of 8 adapters mixed over 32 concurrent requests,
against the base model alone on the same requests, and against PEFT serving the adapters one
request at a time (the issue's benchmark; built-in tiny model, float32).

Each engine run puts all requests in at once and steps until they finish (continuous batching,
``max_num_seqs`` = the request count, prefix caching off); base and LoRA runs alternate
``--repeats`` times after a warm-up and the medians are reported. The PEFT run is a ``PeftModel`` with every adapter
loaded, ``set_adapter`` per request and Hugging Face ``generate`` (greedy, KV cache), one
request after another. Every run decodes exactly ``--max-tokens`` tokens per request (EOS off),
so the rates compare like for like. Adapters are made by PEFT with a fixed seed
(``init_lora_weights=False``: non-zero B) targeting q/k/v/o/gate/up/down at ``--rank``.
The engine's LoRA outputs are checked token for token against PEFT's and the match count printed.

    PYTHONPATH=serving python bench/lora_cpu.py --out bench/results/lora_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    """``count`` PEFT adapters of the model (seeds 0..count-1), saved under ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(out / f"lora-{i}")
        paths.append(out / f"lora-{i}")
    return paths


def build_engine(model_dir: Path, requests: int, prompt_len: int, max_tokens: int, adapters: list[Path],
                 max_loras: int, rank: int):
    """An engine for the whole batch at once (prefix caching off: repeats recompute every prompt)."""
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine
    from kubeinfer_serving.lora.adapter import LoRAShapes
    from kubeinfer_serving.lora.peft_format import load_peft_adapter

    config = EngineConfig(device="cpu", max_num_seqs=requests, max_loras=max_loras, max_lora_rank=rank,
                          enable_prefix_caching=False,
                          num_kv_blocks=requests * (-(-(prompt_len + max_tokens) // 16) + 1))
    engine = LLMEngine.from_model_dir(model_dir, model_name="bench", config=config)
    shapes = LoRAShapes.from_hf_config(engine.hf_config)
    for i, path in enumerate(adapters):
        engine.add_lora(load_peft_adapter(path, f"lora-{i}", shapes, rank))
    return engine


def run_engine(engine, prompts: list[list[int]], loras: list[str | None], max_tokens: int
               ) -> tuple[float, list[list[int]]]:
    """Seconds for ``engine`` to finish every request (all added at once), and each request's tokens."""
    from kubeinfer_serving.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    t0 = time.perf_counter()
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(str(i), prompt, params, lora=lora)
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    seconds = time.perf_counter() - t0
    return seconds, [out[str(i)] for i in range(len(prompts))]


def run_peft(model_dir: Path, prompts: list[list[int]], loras: list[str], max_tokens: int,
             adapters: list[Path]) -> tuple[float, list[list[int]]]:
    """Seconds for PEFT to serve the requests one at a time (adapter switched per request), and the tokens."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="lora-0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"lora-{i}")
    model.eval()

    def generate(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)
        return gen[0, len(prompt):].tolist()

    model.set_adapter(loras[0])
    generate(prompts[0][:8], 2)  # warm-up
    t0 = time.perf_counter()
    tokens = []
    for prompt, lora in zip(prompts, loras, strict=True):
        model.set_adapter(lora)
        tokens.append(generate(prompt, max_tokens))
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="engine runs of each kind; the median is reported")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from kubeinfer_serving.models.builtin import ensure_builtin_model

    model_dir = ensure_builtin_model()
    rng = random.Random(0)
    prompts = [[rng.randrange(6, 8192) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    names = [f"lora-{i % args.adapters}" for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model_dir, Path(tmp), args.adapters, args.rank)
        base = build_engine(model_dir, args.requests, args.prompt_len, args.max_tokens, [], 0, args.rank)
        lora = build_engine(model_dir, args.requests, args.prompt_len, args.max_tokens, adapters, args.adapters,
                            args.rank)
        run_engine(base, prompts[:4], [None] * 4, 4)  # warm-up (allocator, kernels) outside the timing
        run_engine(lora, prompts[:4], names[:4], 4)
        base_runs, lora_runs = [], []
        for _ in range(args.repeats):  # interleaved, so load changes on the machine hit both alike
            base_runs.append(run_engine(base, prompts, [None] * args.requests, args.max_tokens)[0])
            seconds, lora_tokens = run_engine(lora, prompts, names, args.max_tokens)
            lora_runs.append(seconds)
        base_s, lora_s = statistics.median(base_runs), statistics.median(lora_runs)
        peft_s, peft_tokens = run_peft(model_dir, prompts, names, args.max_tokens, adapters)
    total = args.requests * args.max_tokens
    rows = {"base alone (engine)": base_s, f"{args.adapters} adapters mixed (engine)": lora_s,
            "PEFT, one request at a time": peft_s}
    result = {
        "config": vars(args) | {"out": str(args.out) if args.out else None, "device": "cpu",
                                "model": "tiny-llama (built-in)"},
        "output_tokens": total,
        "tokens_per_s": {k: total / v for k, v in rows.items()},
        "engine_runs_s": {"base": base_runs, "lora": lora_runs},
        "lora_vs_base": base_s / lora_s,
        "lora_vs_peft": peft_s / lora_s,
        "outputs_equal_to_peft": sum(a == b for a, b in zip(lora_tokens, peft_tokens, strict=True)),
    }
    print(f"{'run':40s} {'s':>8s} {'out tok/s':>10s}")
    for k, v in rows.items():
        print(f"{k:40s} {v:8.2f} {total / v:10.1f}")
    print(f"LoRA mixed / base throughput: {result['lora_vs_base']:.3f}; LoRA mixed / PEFT: "
          f"{result['lora_vs_peft']:.1f}x; engine outputs equal to PEFT's: "
          f"{result['outputs_equal_to_peft']}/{args.requests}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
