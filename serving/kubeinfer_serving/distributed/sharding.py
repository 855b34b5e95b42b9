"""How a Llama-family checkpoint splits over tensor-parallel ranks, and per-rank weight loading.

Megatron-LM's layout (Shoeybi et al. 2019), as vLLM's ``ColumnParallelLinear``,
``RowParallelLinear`` and ``VocabParallelEmbedding`` lay it out:

* column-parallel (output rows split): ``q_proj`` by query heads, ``k_proj``/``v_proj`` by KV heads,
  ``gate_proj``/``up_proj`` by intermediate rows. Our stacked ``qkv_proj`` / ``gate_up_proj``
  then hold, on each rank, that rank's q | k | v (gate | up) slices stacked, so the local split of
  the stacked output is the same as on one rank with fewer heads;
* row-parallel (input columns split): ``o_proj`` and ``down_proj``; the partial products are summed
  by one all-reduce; their bias is held by rank 0 alone (zero elsewhere), so the sum adds it once;
* vocabulary-parallel: ``embed_tokens`` and ``lm_head`` rows split into ``ceil(V / size)`` rows per
  rank, the last rank's padded with zero rows (tied embeddings share the same shard);
* KV heads fewer than ranks: each KV head is replicated on ``size / KVH`` consecutive ranks
  (rank ``r`` holds KV head ``r * KVH // size``, which is the head its query heads use).

Norms are replicated. Weights are read per rank with ``safetensors``' ``get_slice``, so a rank
reads only its rows/columns from the memory-mapped file, never the full tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open


class TensorParallelError(ValueError):
    """A model cannot be split over the asked number of ranks; the message names the numbers."""


@dataclass(frozen=True)
class TPShape:
    """One rank's share of a model.

    Attributes:
        rank, size: the rank and the group size.
        num_heads, num_kv_heads: query and KV heads this rank computes.
        intermediate: MLP intermediate rows this rank holds.
        vocab_per_rank: embedding / LM-head rows per rank (``ceil(V / size)``).
        vocab_size: the full vocabulary.
        head_dim: features per head.
        kv_replicas: ranks holding each KV head (1 when KV heads >= ranks).
    """

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab_per_rank: int
    vocab_size: int
    head_dim: int
    kv_replicas: int

    @property
    def vocab_start(self) -> int:
        """First vocabulary row this rank holds."""
        return self.rank * self.vocab_per_rank

    @property
    def kv_head_start(self) -> int:
        """First KV head (of the full model) this rank holds."""
        return (self.rank // self.kv_replicas) * self.num_kv_heads


def tp_shape(config: Any, rank: int, size: int) -> TPShape:
    """Split ``config`` (a Hugging Face Llama-family config) over ``size`` ranks; ``rank``'s share.

    Raises:
        TensorParallelError: the query heads, KV heads or intermediate size do not divide (the
            message names the numbers), or ``size`` < 1.
    """
    if size < 1:
        raise TensorParallelError(f"tensor parallel size must be >= 1, got {size}")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    inter = int(config.intermediate_size)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if heads % size:
        raise TensorParallelError(f"the model's {heads} attention heads do not divide by tensor parallel size {size}")
    if kv % size and size % kv:
        raise TensorParallelError(f"the model's {kv} KV heads and tensor parallel size {size} do not divide "
                                  "one another (KV heads must be a multiple or a divisor of the size)")
    if inter % size:
        raise TensorParallelError(f"the model's intermediate size {inter} does not divide by tensor parallel "
                                  f"size {size}")
    vocab = int(config.vocab_size)
    replicas = size // kv if kv < size else 1
    return TPShape(rank, size, heads // size, max(1, kv // size), inter // size, -(-vocab // size), vocab,
                   head_dim, replicas)


def _rule(name: str, shape: TPShape) -> tuple[int, int, int] | str | None:
    """How checkpoint tensor ``name`` is cut for ``shape.rank``: (dim, start, stop), ``"vocab"``,
    ``"zero"`` (a row-parallel bias off rank 0), or None (replicated)."""
    d = shape.head_dim
    if ".q_proj." in name:
        n = shape.num_heads * d
        return 0, shape.rank * n, (shape.rank + 1) * n
    if ".k_proj." in name or ".v_proj." in name:
        n = shape.num_kv_heads * d
        start = shape.kv_head_start * d
        return 0, start, start + n
    if ".gate_proj." in name or ".up_proj." in name:
        n = shape.intermediate
        return 0, shape.rank * n, (shape.rank + 1) * n
    if ".o_proj." in name or ".down_proj." in name:
        if name.endswith(".bias"):
            return None if shape.rank == 0 else "zero"
        n = shape.num_heads * d if ".o_proj." in name else shape.intermediate
        return 1, shape.rank * n, (shape.rank + 1) * n
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        return "vocab"
    return None


def shard_tensor(name: str, source: Any, full_shape: tuple[int, ...], shape: TPShape) -> torch.Tensor:
    """``shape.rank``'s part of checkpoint tensor ``name``.

    Args:
        name: the checkpoint name (Hugging Face naming).
        source: a ``safetensors`` slice (``get_slice``) or a tensor: only the rank's part is read.
        full_shape: the tensor's full shape.
        shape: the rank's share.

    Returns:
        the part, a new tensor (vocabulary shards of the last rank padded with zero rows to
        ``vocab_per_rank``).
    """
    rule = _rule(name, shape)
    if rule is None:
        return source[:] if not isinstance(source, torch.Tensor) else source
    if rule == "zero":
        return torch.zeros(full_shape, dtype=_dtype_of(source))
    if rule == "vocab":
        start = min(shape.vocab_start, full_shape[0])
        stop = min(start + shape.vocab_per_rank, full_shape[0])
        part = source[start:stop]
        if stop - start < shape.vocab_per_rank:
            pad = torch.zeros((shape.vocab_per_rank - (stop - start),) + tuple(full_shape[1:]), dtype=part.dtype)
            part = torch.cat([part, pad])
        return part
    dim, start, stop = rule
    return source[start:stop] if dim == 0 else source[:, start:stop]


def _dtype_of(source: Any) -> torch.dtype:
    if isinstance(source, torch.Tensor):
        return source.dtype
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return names.get(source.get_dtype(), torch.float32)


def iter_rank_safetensors(path: str | Path, shape: TPShape) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, rank's part)`` for every tensor of a safetensors model directory, each read
    through ``get_slice`` (only the rank's rows or columns leave the memory-mapped file).

    Raises:
        kubeinfer_serving.models.loader.ModelLoadError: missing or corrupt weight files (naming the file).
    """
    from kubeinfer_serving.models.loader import ModelLoadError, _read_header, safetensors_files

    for file in safetensors_files(path):
        _read_header(file)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    yield name, shard_tensor(name, sl, tuple(sl.get_shape()), shape)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"corrupt safetensors file {file}: {exc}") from exc


def iter_rank_weights(path: str | Path, shape: TPShape, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The rank's parts of a model's weights: sliced from safetensors (see
    :func:`iter_rank_safetensors`) or, for a ``.gguf`` file, cut from each dequantized tensor."""
    from kubeinfer_serving.models import gguf

    if gguf.is_gguf(path):
        for name, t in gguf.iter_gguf_weights(path, dtype=dtype):
            yield name, shard_tensor(name, t, tuple(t.shape), shape)
        return
    yield from iter_rank_safetensors(path, shape)
