"""The decode roofline: how close decode steps come to the memory-bandwidth bound.

A decode step reads every weight once and, for each running sequence, the K and V of every
position of its context (the new token's included: written, then read by attention). With
``W`` weight bytes, ``b`` KV bytes per token and ``C`` context tokens over the batch, a step
moves at least ``W + b * C`` bytes, so at a bandwidth ``B`` it takes at least
``(W + b * C) / B`` seconds and produces one token per row. The bandwidth is measured on the
device as a device-to-device copy of a large buffer (the copy reads and writes, so it moves
twice its size), the practical HBM bandwidth rather than the datasheet figure.

Also here: model shapes written from the published ``config.json`` of Llama-3.2-1B and
Llama-3.1-8B (no hub access), and random weights for them, for GPU workloads without a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), the fields the model reads.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": 128001,
}
#: Llama-3.1-8B's config.json (meta-llama/Llama-3.1-8B), the fields the model reads.
LLAMA_3_1_8B = dict(
    LLAMA_3_2_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
    tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B}


def shapes_config(name: str):
    """The ``transformers.LlamaConfig`` of one of :data:`SHAPES`.

    Raises:
        KeyError: an unknown name.
    """
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[name])


def random_weights(config, dtype: torch.dtype, device: torch.device, seed: int = 0, std: float = 0.02
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for our Llama built from ``config``, one tensor at a time (peak memory: one tensor).

    Linear and embedding weights are N(0, std) (the config's ``initializer_range`` convention),
    norm weights are 1, biases 0. Names are the model's own parameter names, which
    :meth:`kubeinfer_serving.models.llama.LlamaForCausalLM.load_weights` accepts.

    Yields:
        (name, tensor in ``dtype`` on ``device``).
    """
    from kubeinfer_serving.models.llama import LlamaForCausalLM

    meta = LlamaForCausalLM(config, max_positions=1, dtype=dtype, device=torch.device("meta"))
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in meta.named_parameters():
        if name.endswith("norm.weight"):
            yield name, torch.ones(p.shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            yield name, torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            yield name, (torch.randn(p.shape, generator=gen, device=device) * std).to(dtype)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V bytes one token occupies over all layers."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def decode_step_bytes(weights_bytes: int, kv_per_token: int, context_tokens: int) -> int:
    """Least bytes a decode step moves: every weight once, plus the K/V of ``context_tokens`` positions."""
    return weights_bytes + kv_per_token * context_tokens


@dataclass
class DecodeStep:
    """One measured pure-decode step: wall seconds, rows (= tokens produced), context tokens over the batch."""

    seconds: float
    rows: int
    context_tokens: int


def summarize_decode(steps: list[DecodeStep], weights_bytes: int, kv_per_token: int, bandwidth: float) -> dict:
    """Decode tokens/s against the roofline over measured steps.

    Args:
        steps: pure-decode steps.
        weights_bytes: bytes of all weights (tied ones once).
        kv_per_token: :func:`kv_bytes_per_token`.
        bandwidth: bytes/s (:func:`measure_copy_bandwidth`).

    Returns:
        dict: ``steps``, ``tokens``, ``seconds``, ``decode_tok_s`` (tokens / seconds),
        ``bytes`` (sum of :func:`decode_step_bytes`), ``ideal_seconds`` (bytes / bandwidth),
        ``roofline_tok_s`` (tokens / ideal seconds), ``fraction`` (ideal / measured seconds),
        ``mean_batch``, ``mean_context`` (tokens per row), ``bandwidth``.

    Raises:
        ValueError: no steps, or a non-positive bandwidth.
    """
    if not steps:
        raise ValueError("no pure-decode steps to summarise")
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    tokens = sum(s.rows for s in steps)
    seconds = sum(s.seconds for s in steps)
    moved = sum(decode_step_bytes(weights_bytes, kv_per_token, s.context_tokens) for s in steps)
    ideal = moved / bandwidth
    return {
        "steps": len(steps), "tokens": tokens, "seconds": seconds, "decode_tok_s": tokens / seconds,
        "bytes": moved, "ideal_seconds": ideal, "roofline_tok_s": tokens / ideal, "fraction": ideal / seconds,
        "mean_batch": tokens / len(steps), "mean_context": sum(s.context_tokens for s in steps) / tokens,
        "bandwidth": bandwidth,
    }


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device memory bandwidth in bytes/s from a device-to-device copy of ``nbytes`` (read + write counted).

    On CUDA timed with events after a warm-up copy; the median of ``iters`` copies. On CPU it
    times ``Tensor.copy_`` the same way (a DRAM figure, for completeness).
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def format_roofline(concurrency: int, s: dict) -> str:
    """One line: decode tokens/s next to the roofline and the fraction reached."""
    return (f"decode at concurrency {concurrency}: {s['decode_tok_s']:,.0f} tok/s; roofline "
            f"{s['roofline_tok_s']:,.0f} tok/s (weights + KV {s['bytes'] / s['steps'] / 1e9:.2f} GB/step, batch "
            f"{s['mean_batch']:.0f}, context {s['mean_context']:.0f}, copy bandwidth {s['bandwidth'] / 1e12:.2f} TB/s)"
            f" -> {100 * s['fraction']:.1f}% of the roofline")
