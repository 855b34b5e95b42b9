"""Our Llama-family decoder (Llama 2/3, Mistral, Qwen2) running over the engine's paged KV cache.

The module tree and parameter names follow Hugging Face's ``LlamaForCausalLM`` (so checkpoint
tensors load by name), except that q/k/v and gate/up projections are stacked at load time into
``qkv_proj`` and ``gate_up_proj`` (one matmul each instead of three and two, as vLLM does);
activations are flattened: a step's tokens from all sequences form
one [T, hidden] batch with explicit positions, and attention goes through
:func:`kubeinfer_serving.layers.attention.paged_attention`. The maths follow Touvron et al.
2023 (Llama: RMSNorm pre-norm, SwiGLU MLP, rotary position embeddings of Su et al. 2021,
grouped-query attention of Ainslie et al. 2023) and match the Hugging Face implementation
operation for operation so that float32 greedy decoding agrees token for token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from kubeinfer_serving.layers.activation_norm import add_rms_norm, silu_and_mul
from kubeinfer_serving.layers.attention import AttentionMetadata
from kubeinfer_serving.layers.rotary import RotaryInputs, rope_paged_attention, rotary_inputs

if TYPE_CHECKING:
    from kubeinfer_serving.distributed.group import TPGroup
    from kubeinfer_serving.distributed.sharding import TPShape
    from kubeinfer_serving.lora.slots import LoRAStep

#: Architectures this implementation runs (the ``architectures`` field of config.json).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32 like Hugging Face,
    optionally fused with the residual add before it (see
    :func:`kubeinfer_serving.layers.activation_norm.add_rms_norm`).

    Args:
        hidden_size: features; eps: added to the mean square.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, hidden] -> (norm(x + residual), x + residual); residual None: (norm(x), x)."""
        return add_rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] float32 and the cos/sin scale of the config's RoPE.

    Uses transformers' ``ROPE_INIT_FUNCTIONS`` for scaled variants (linear, llama3, yarn) so
    the values equal Hugging Face's. Raises ``WeightLoadError`` for length-dependent
    variants (dynamic, longrope), which this engine does not implement.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _STATIC_ROPE_TYPES:
        raise WeightLoadError(f"rope_type {rope_type!r} is not supported (supported: {_STATIC_ROPE_TYPES})")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        return inv_freq.float(), float(scale)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, 1.0


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE over the paged KV cache."""

    def __init__(self, config, head_dim: int, layer_idx: int = 0, tp: TPGroup | None = None,
                 shard: TPShape | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        if shard is not None:  # tensor parallel: this rank's heads (qkv column-, o row-parallel)
            self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
        self.tp = tp
        self.head_dim = head_dim
        qwen2 = getattr(config, "model_type", "") == "qwen2"
        qkv_bias = bool(getattr(config, "attention_bias", False)) or qwen2
        o_bias = bool(getattr(config, "attention_bias", False)) and not qwen2
        h = config.hidden_size
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # q_proj, k_proj and v_proj of the checkpoint stacked by rows: one matmul instead of three.
        self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * head_dim, h, bias=o_bias)
        self.scale = head_dim ** -0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryInputs,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        keep: torch.Tensor | None = None,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; rotates q/k by ``rope`` and writes K/V into ``kv_cache``.

        ``keep`` ([R] int64 row indexes): project only those rows' attention output -> [R, hidden]
        (all T rows still write their K/V). ``lora``: the step's per-row adapters (its ``kept``
        mapping applies to the kept rows), or None.
        """
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.apply(self.layer_idx, "qkv", x, qkv)
        o = rope_paged_attention(qkv, rope, kv_cache, meta, self.num_heads, self.num_kv_heads,
                                 self.head_dim, self.scale)
        if keep is not None:
            o = o.index_select(0, keep)
            lora = lora.kept if lora is not None else None
        o = o.reshape(o.shape[0], self.num_heads * self.head_dim)
        out = self.o_proj(o)
        if lora is not None:
            lora.apply(self.layer_idx, "o", o, out)
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config, layer_idx: int = 0, tp: TPGroup | None = None, shard: TPShape | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size if shard is None else shard.intermediate
        # gate_proj and up_proj of the checkpoint stacked by rows: one matmul instead of two.
        # Tensor parallel: gate_up column-parallel (this rank's gate | up rows), down row-parallel.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, lora: LoRAStep | None = None) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]; ``lora``: the rows' adapters, or None."""
        if lora is None:
            out = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        else:
            gate_up = lora.apply(self.layer_idx, "gate_up", x, self.gate_up_proj(x))
            act = silu_and_mul(gate_up)
            out = lora.apply(self.layer_idx, "down", act, self.down_proj(act))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, head_dim: int, layer_idx: int = 0, tp: TPGroup | None = None,
                 shard: TPShape | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(config, head_dim, layer_idx, tp, shard)
        self.mlp = MLP(config, layer_idx, tp, shard)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, rope, kv_cache, meta, keep=None, lora=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) [T, hidden] -> (mlp output, residual before it); residual None for layer 0.

        The residual add of each sublayer is fused into the norm that follows it:
        ``h, residual = norm(x, residual)``, as in vLLM's Llama. ``keep`` ([R] int64): after
        attention (which writes every row's K/V) only those rows go on -> [R, hidden] outputs.
        ``lora`` (:class:`~kubeinfer_serving.lora.slots.LoRAStep`): the rows' adapters, or None.
        """
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, keep, lora)
        if keep is not None:
            residual = residual.index_select(0, keep)
            lora = lora.kept if lora is not None else None
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, lora), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm (HF name ``model``)."""

    def __init__(self, config, head_dim: int, tp: TPGroup | None = None, shard: TPShape | None = None) -> None:
        super().__init__()
        if tp is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            from kubeinfer_serving.distributed.embedding import VocabParallelEmbedding

            self.embed_tokens = VocabParallelEmbedding(shard.vocab_per_rank, shard.vocab_start, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, head_dim, i, tp, shard)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over a paged KV cache.

    Args:
        config: the Hugging Face config (``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``).
        max_positions: positions to precompute RoPE tables for (the engine's max_model_len).
        dtype: weights dtype (float32 on CPU, bfloat16 on CUDA usually).
        device: where weights live.
        tp: this rank's tensor-parallel group, or None (one rank). With a group the model holds this
            rank's shard (:mod:`kubeinfer_serving.distributed.sharding`): its query and KV heads,
            its MLP rows, its vocabulary rows; load it with the rank's parts of the checkpoint
            (:func:`~kubeinfer_serving.distributed.sharding.iter_rank_weights`). Every rank must
            then run every forward and :meth:`compute_logits` call in the same order.

    Raises:
        kubeinfer_serving.distributed.sharding.TensorParallelError: with ``tp``, heads or sizes that
            do not divide by the group size.

    The parameters are created uninitialised; call :meth:`load_weights` before use.
    Mistral's sliding window is not applied: the engine caps ``max_model_len`` at the window.
    """

    def __init__(self, config, max_positions: int, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.tp = tp
        shard = None
        vocab_rows = config.vocab_size
        if tp is not None:
            from kubeinfer_serving.distributed.sharding import tp_shape

            shard = tp_shape(config, tp.rank, tp.size)
            self.num_kv_heads = shard.num_kv_heads
            vocab_rows = shard.vocab_per_rank
        #: this rank's share of the model (None: one rank).
        self.shard = shard
        with torch.device("meta"):
            self.model = LlamaModel(config, self.head_dim, tp, shard)
            self.lm_head = nn.Linear(config.hidden_size, vocab_rows, bias=False)
        # dtype first, on meta (no memory), then real storage once, in the final dtype.
        self.to(dtype)
        self.to_empty(device=device)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.dtype = dtype
        inv_freq, scale = rope_inv_freq(config)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", (emb.cos() * scale).to(device), persistent=False)
        self.register_buffer("sin_cache", (emb.sin() * scale).to(device), persistent=False)

    @property
    def num_layers(self) -> int:
        """Decoder layers (one KV cache pair each)."""
        return len(self.model.layers)

    def _stacked_shards(self) -> dict[str, tuple[str, str, int, int]]:
        """Checkpoint name suffix -> (merged parameter suffix, shard id, first row, rows)."""
        a = self.model.layers[0].self_attn
        inter = self.model.layers[0].mlp.down_proj.in_features
        return {
            "self_attn.q_proj": ("self_attn.qkv_proj", "q", 0, a.q_size),
            "self_attn.k_proj": ("self_attn.qkv_proj", "k", a.q_size, a.kv_size),
            "self_attn.v_proj": ("self_attn.qkv_proj", "v", a.q_size + a.kv_size, a.kv_size),
            "mlp.gate_proj": ("mlp.gate_up_proj", "gate", 0, inter),
            "mlp.up_proj": ("mlp.gate_up_proj", "up", inter, inter),
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into the parameters.

        Accepts Hugging Face names (``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``
        are copied into row slices of the merged ``qkv_proj`` / ``gate_up_proj``) and this
        model's own parameter names (e.g. a snapshot of :meth:`named_parameters`).

        Args:
            weights: (name, tensor) pairs, e.g. from ``loader.iter_safetensors``; any dtype.

        Raises:
            WeightLoadError: a tensor's shape differs, or a parameter (or shard of a merged
                parameter) got no tensor.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        shards = self._stacked_shards()
        need: dict[str, set[str]] = {}
        for name in params:
            for merged, shard, _, _ in shards.values():
                if f".{merged}." in name:
                    need.setdefault(name, set()).add(shard)
        loaded: dict[str, set[str]] = {}
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard, rows = name, "full", None
            if name not in params:
                for ckpt, (merged, shard_id, first, count) in shards.items():
                    if f".{ckpt}." in name:
                        target, shard, rows = name.replace(f".{ckpt}.", f".{merged}."), shard_id, (first, count)
                        break
            param = params.get(target)
            if param is None:
                raise WeightLoadError(f"unexpected tensor {name!r} in checkpoint")
            dest = param if rows is None else param[rows[0]:rows[0] + rows[1]]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(tensor.to(dtype=param.dtype))
            loaded.setdefault(target, set()).add(shard)
        if self.tie_word_embeddings:
            loaded.setdefault("lm_head.weight", set()).add("full")
        missing = sorted(
            n for n in params
            if "full" not in loaded.get(n, set()) and not (n in need and need[n] <= loaded.get(n, set()))
        )
        if missing:
            raise WeightLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        keep: torch.Tensor | None = None,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        """Run one step.

        Args:
            input_ids: [T] int64 token ids of all scheduled tokens, flattened.
            positions: [T] int64 position of each token in its sequence.
            kv_caches: per layer (k_cache, v_cache), each [num_blocks, block_size, KVH, head_dim].
            meta: slot mapping and per-sequence attention layout.
            keep: [R] int64 rows whose final hidden state is wanted (e.g. the last token of each
                sequence that samples), or None for all. The last layer then runs its output
                projection, MLP and norms for those rows only: a prefill chunk's other tokens
                need only their K/V, which every layer still writes.
            lora: which LoRA adapter slot each row uses (with ``kept`` set for ``keep``), or None:
                the base model for every row.

        Returns:
            [T, hidden] final hidden states (dtype of the weights), or [R, hidden] for ``keep``.
        """
        x = self.model.embed_tokens(input_ids)
        rope = rotary_inputs(positions, self.cos_cache, self.sin_cache, x.dtype)
        residual = None
        last = len(self.model.layers) - 1
        for i, (layer, kv) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            x, residual = layer(x, residual, rope, kv, meta, keep if i == last else None, lora)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] float32 logits.

        Tensor parallel: each rank computes its vocabulary rows' logits; rank 0 gathers them
        (padding rows past the vocabulary dropped) and returns [N, vocab]; the other ranks return None.
        """
        logits = self.lm_head(hidden)
        if self.tp is not None:
            logits = self.tp.gather_last_dim(logits)
            if logits is None:
                return None
            logits = logits[:, :self.config.vocab_size]
        return logits.float()
