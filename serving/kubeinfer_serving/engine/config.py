"""Engine configuration and the stats snapshot it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kubeinfer_serving.config import canonical_dtype, fallback
from kubeinfer_serving.layers.quant import QUANTIZATION_MODES

if TYPE_CHECKING:
    from .kv_sizing import KVSizing

#: ``sizer(weights_bytes, activation_bytes or None, block_bytes, max_blocks, graph_bytes or None,
#: extra_blocks) -> KVSizing``: ``graph_bytes`` is the measured decode CUDA graph memory (None: no
#: graphs), ``extra_blocks`` the blocks allocated past the pool (1 with graphs: the null block).
KVPoolSizer = Callable[[int, "int | None", int, int, "int | None", int], "KVSizing"]

#: KV pool size on CPU when neither ``num_kv_blocks`` nor ``kv_cache_memory_bytes`` is given.
CPU_DEFAULT_KV_BYTES = 256 * 1024 * 1024
#: Fraction of the free GPU memory (after weights) the KV pool takes by default on CUDA.
CUDA_DEFAULT_KV_FRACTION = 0.5
#: Canonical dtype names (:data:`kubeinfer_serving.config.DTYPE_NAMES`) -> torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: torch.device | str | None) -> torch.device:
    """``device``, else CUDA when available, else CPU: the one device default of the serving pod."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The torch dtype of a dtype or any spelling :func:`~kubeinfer_serving.config.canonical_dtype` takes;
    None/``auto``: bfloat16 on CUDA, float32 on CPU.

    Raises:
        ValueError: an unknown spelling.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = canonical_dtype(dtype)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


@dataclass
class EngineConfig:
    """Knobs of one engine (vLLM's names and defaults where they exist).

    Attributes:
        max_num_seqs: most sequences in the running batch.
        max_num_batched_tokens: token budget of one step (prefill chunks + one per decode).
        block_size: tokens per KV-cache block.
        num_kv_blocks: KV pool size in blocks; overrides ``kv_cache_memory_bytes``.
        kv_pool_sizer: sizes the pool from the loaded weights, the activation peak of a
            profiling step (measured on CUDA, None on CPU; :mod:`.kv_sizing`) and the decode CUDA
            graphs' measured memory and null block (when graphs are on); the registry
            passes one that applies the pod's memory budget. Used when ``num_kv_blocks`` is None;
            overrides ``kv_cache_memory_bytes``.
        kv_cache_memory_bytes: KV pool size in bytes. Default: on CPU
            min(256 MiB, what max_num_seqs full-length sequences need); on CUDA half of the
            free device memory after the weights load, bounded the same way.
        max_model_len: context length in tokens (prompt + output); default the model's
            ``max_position_embeddings``; capped at what the KV pool holds.
        max_waiting_requests: queue cap; beyond it ``QueueFullError`` (HTTP 429).
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        device: "cuda", "cpu" or None (CUDA when available).
        dtype: weights/KV dtype or None (bfloat16 on CUDA, float32 on CPU).
        scheduling_policy: ``fcfs`` (arrival order) or ``priority`` (requests' ``priority``,
            lower first; preemption takes the lowest priority first), vLLM's two policies.
        enforce_eager: never run decode steps as CUDA graphs (vLLM's ``enforce_eager``); see
            :mod:`kubeinfer_serving.engine.cuda_graphs` for when graphs run otherwise.
        max_loras: LoRA adapter slots on the device (vLLM's ``max_loras``): adapters one step
            can mix; 0 turns LoRA off.
        max_lora_rank: the highest adapter rank the slots hold (vLLM's ``max_lora_rank``).
        quantization: ``none``, ``int8`` (weight-only, per channel) or ``fp8`` (CUDA) for the
            decoder layers' projections (:mod:`kubeinfer_serving.layers.quant`).
        tensor_parallel_size: ranks the model is split over (vLLM's ``tensor_parallel_size``;
            :mod:`kubeinfer_serving.distributed`); > 1 needs a model directory
            (:meth:`~.llm_engine.LLMEngine.from_model_dir`).
    """

    max_num_seqs: int = fallback("max_num_seqs")
    max_num_batched_tokens: int = fallback("max_num_batched_tokens")
    block_size: int = fallback("block_size")
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    max_waiting_requests: int = fallback("max_waiting_requests")
    enable_prefix_caching: bool = True
    device: str | None = None
    dtype: torch.dtype | str | None = None
    scheduling_policy: str = fallback("scheduling_policy")
    kv_pool_sizer: KVPoolSizer | None = None
    enforce_eager: bool = fallback("enforce_eager")
    max_loras: int = 0
    max_lora_rank: int = fallback("max_lora_rank")
    quantization: str = "none"
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {self.quantization!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting_requests",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras must be >= 0 and max_lora_rank >= 1, got {self.max_loras}, "
                             f"{self.max_lora_rank}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def resolve_device(self) -> torch.device:
        """The device to run on: the configured one, else CUDA when available, else CPU."""
        return pick_device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """Weights/KV dtype: the configured one, else bfloat16 on CUDA and float32 on CPU."""
        return torch_dtype(self.dtype, device)


@dataclass
class EngineStats:
    """A snapshot of the engine's load.

    Attributes:
        num_waiting: requests queued, not yet running (includes preempted ones).
        num_running: sequences in the running batch.
        num_free_blocks: KV blocks not referenced by any sequence (cached-free included).
        num_total_blocks: KV pool size in blocks.
        kv_cache_usage: 1 - free/total, in 0..1.
    """

    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
