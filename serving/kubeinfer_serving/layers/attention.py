"""Attention over the paged KV cache: the step's metadata and the backend dispatch.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, num_kv_heads,
head_dim]; token position p of a sequence lives in slot ``block_table[p // block_size] *
block_size + p % block_size`` (PagedAttention, Kwon et al., SOSP 2023). A step's queries
are packed back to back (varlen): sequence i owns queries ``query_start_loc[i] ..
query_start_loc[i+1]``, which are its positions ``seq_lens[i] - q_len .. seq_lens[i] - 1``
(a decode row has one query; a prefill chunk has many, after any cached or earlier-chunk
context).

Three backends compute the same thing:

* ``triton`` (CUDA): :func:`kubeinfer_serving.layers.paged_attention_triton.paged_attention_triton`,
  one launch for all decode rows and prefill chunks, reading K/V in place through the block table.
* ``cpu`` (CPU, float32, one torch thread): decode rows through
  :func:`kubeinfer_serving.layers.paged_attention_cpu.decode_attention_cpu`, a single-threaded
  Numba kernel that reads K/V in place through the block table; prefill chunks as in the reference.
* ``reference`` (CPU with other dtypes or more torch threads, and the test oracle): gathers each
  sequence's blocks and runs ``torch.nn.functional.scaled_dot_product_attention`` -- decoding
  sequences in groups of similar context length (:func:`group_by_length`), each group padded
  to its longest context with a key mask; prefill chunks one by one, causal, with the chunk's
  queries at the end of its context.

The backend is chosen per call by :func:`attention_backend`: Triton for CUDA tensors, ``cpu``
for float32 CPU tensors when torch runs one intra-op thread (and Numba imports), the reference
otherwise (with more threads the reference's gather + SDPA run multi-threaded and were faster).
``KUBEINFER_ATTENTION_BACKEND=reference`` forces the reference everywhere;
``KUBEINFER_ATTENTION_BACKEND=triton`` forces Triton everywhere (on CPU only useful under
``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

#: Environment variable that forces an attention backend ("triton" or "reference").
BACKEND_ENV = "KUBEINFER_ATTENTION_BACKEND"

log = logging.getLogger(__name__)


@dataclass
class PrefillChunk:
    """One sequence's multi-token chunk, as the reference backend runs it.

    Attributes:
        q_start: index of its first token in the flattened batch.
        q_len: tokens in the chunk.
        kv_blocks: [nb] int64 block ids holding positions 0..ctx_len-1 (context + chunk).
        mask: [q_len, nb * block_size] bool (True = attend), or None when the chunk has no
            earlier context (plain causal attention over the chunk's own K/V).
    """

    q_start: int
    q_len: int
    kv_blocks: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class DecodeGroup:
    """Decode rows of similar context length, attended together (padded to the group's longest).

    Attributes:
        size: n, rows in the group.
        kv_blocks: [n * nb] int64 the rows' block tables (nb blocks each, padded with block 0), flattened.
        mask: [n, 1, 1, nb * block_size] bool key mask (True = a real context position).
    """

    size: int
    kv_blocks: torch.Tensor
    mask: torch.Tensor


@dataclass
class DecodeRows:
    """Decode rows as the ``cpu`` backend's kernel reads them (host arrays, in batch order).

    Attributes:
        q_rows: [Bd] int64 batch positions of the single-token queries after context.
        block_tables: [Bd, nb] int64 their block tables (C-contiguous; nb = the step's widest).
        seq_lens: [Bd] int64 their context lengths, the new token included.
    """

    q_rows: np.ndarray
    block_tables: np.ndarray
    seq_lens: np.ndarray


@dataclass
class ReferencePlan:
    """How the reference backend splits a step (built once per step, shared by all layers).

    Attributes:
        prefills: multi-token chunks (and first-token rows without context).
        decode_idx: [Bd] int64 batch positions of the single-token queries after context,
            group after group (or None when there are none).
        decode_groups: those rows grouped by context length (see :func:`group_by_length`);
            group g owns the next ``size`` entries of ``decode_idx``.
        decode_rows: the same rows ungrouped, for the ``cpu`` backend's kernel (then
            ``decode_idx`` is None and ``decode_groups`` empty).
    """

    prefills: list[PrefillChunk]
    decode_idx: torch.Tensor | None = None
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    decode_rows: DecodeRows | None = None


@dataclass
class AttentionMetadata:
    """Per-step inputs of :func:`paged_attention`, shared by all layers.

    Attributes:
        slot_mapping: [T] int64 cache slot of each token of the flattened batch (device).
        query_start_loc: [B+1] int64 cumulative query counts (device).
        seq_lens: [B] int64 context length of each sequence after this step (device).
        block_tables: [B, max_blocks] int64 block tables, padded with 0 (device).
        max_query_len: longest query run of the step (host int).
        max_seq_len: longest context of the step (host int).
        query_start_loc_cpu / seq_lens_cpu / block_tables_cpu: host (NumPy) copies of the
            above, used to plan the reference backend without a device-to-host sync.
        block_size: tokens per KV block.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: np.ndarray
    seq_lens_cpu: np.ndarray
    block_tables_cpu: np.ndarray
    block_size: int
    _reference: ReferencePlan | None = field(default=None, repr=False)
    _cpu: ReferencePlan | None = field(default=None, repr=False)

    def reference_plan(self, num_kv_heads: int = 1, head_dim: int = 1) -> ReferencePlan:
        """The reference backend's split of this step (computed on first use, then cached;
        the head shape, the same for every layer, only tunes the decode grouping)."""
        if self._reference is None:
            self._reference = build_reference_plan(self, num_kv_heads, head_dim)
        return self._reference

    def cpu_plan(self) -> ReferencePlan:
        """The ``cpu`` backend's split of this step: prefill chunks and ungrouped decode rows (cached)."""
        if self._cpu is None:
            self._cpu = build_reference_plan(self, group_decodes=False)
        return self._cpu


#: What one more decode group costs on CPU, in padded key elements (rows x positions x KV heads
#: x head dim) attended: a group is one SDPA call plus its gathers, about 50 us of fixed cost
#: for the tiny model on one AVX-512 core, where attending one padded key element (gather
#: included) costs about 1 ns.
GROUP_SPLIT_ELEMENTS = 48 * 1024
#: Most candidate group ends :func:`group_by_length` considers.
_MAX_CUT_POINTS = 32


def group_by_length(num_blocks: np.ndarray, split_cost: float) -> list[np.ndarray]:
    """Split rows into groups that each get padded to their longest row, at the least modelled cost.

    A group costs ``split_cost`` plus (its rows x its largest block count); the partition of
    the rows sorted by block count into consecutive groups that minimises the total is found
    by dynamic programming over the distinct block counts (O(m^2) for m distinct counts).
    Beyond ``_MAX_CUT_POINTS`` distinct counts only that many evenly spaced ones are candidate
    group ends, which bounds the host time per step.

    Args:
        num_blocks: [n] int64 KV blocks each row attends (n >= 1).
        split_cost: the fixed cost of one group, in padded blocks.

    Returns:
        the groups as arrays of row indexes into ``num_blocks``, longest group first.
    """
    order = np.argsort(num_blocks, kind="stable")
    srt = num_blocks[order]
    vals = np.unique(srt)
    if vals.size > _MAX_CUT_POINTS:
        vals = vals[np.unique(np.linspace(0, vals.size - 1, _MAX_CUT_POINTS).round().astype(np.int64))]
    m = vals.size
    # rows_before[k]: rows whose count is at most vals[k-1], i.e. rows in groups ending before k.
    rows_before = [0] + np.searchsorted(srt, vals, side="right").tolist()
    widths = vals.tolist()
    best = [0.0] * (m + 1)
    start = [0] * (m + 1)
    for b in range(1, m + 1):  # a group spanning distinct counts a..b-1 pads to widths[b-1]
        w, rb = widths[b - 1], rows_before[b]
        a_best, c_best = 0, best[0] + rb * w
        for a in range(1, b):
            c = best[a] + (rb - rows_before[a]) * w
            if c < c_best:
                a_best, c_best = a, c
        best[b] = c_best + split_cost
        start[b] = a_best
    groups = []
    b = m
    while b > 0:
        a = start[b]
        groups.append(order[rows_before[a]:rows_before[b]])
        b = a
    return groups


def build_reference_plan(meta: AttentionMetadata, num_kv_heads: int = 1, head_dim: int = 1,
                         group_decodes: bool = True) -> ReferencePlan:
    """Split a step into decode rows (batched, grouped by length) and prefill chunks (one by one) for SDPA.

    Decode rows are grouped with :func:`group_by_length` so that padding to each group's longest
    context stays small, one group costing as much as ``GROUP_SPLIT_ELEMENTS`` padded key elements.
    With ``group_decodes=False`` they are left ungrouped in :attr:`ReferencePlan.decode_rows`
    for the ``cpu`` backend's kernel instead.
    Vectorized over decode rows; loops only over prefill chunks (few per step) and groups.
    """
    dev = meta.slot_mapping.device
    bs = meta.block_size
    qsl = meta.query_start_loc_cpu.astype(np.int64)
    q_lens = qsl[1:] - qsl[:-1]
    seq_lens = meta.seq_lens_cpu.astype(np.int64)
    starts = seq_lens - q_lens
    is_decode = (q_lens == 1) & (starts > 0)
    plan = ReferencePlan(prefills=[])
    for i in np.flatnonzero(~is_decode).tolist():
        s, n, start, ctx = int(qsl[i]), int(q_lens[i]), int(starts[i]), int(seq_lens[i])
        if start == 0:
            plan.prefills.append(PrefillChunk(s, n, torch.empty(0, dtype=torch.int64), None))
            continue
        nb = -(-ctx // bs)
        kv_blocks = torch.from_numpy(meta.block_tables_cpu[i, :nb].astype(np.int64)).to(dev, non_blocking=True)
        rows = torch.arange(n).unsqueeze(1) + start
        mask = (torch.arange(nb * bs).unsqueeze(0) <= rows).to(dev, non_blocking=True)
        plan.prefills.append(PrefillChunk(s, n, kv_blocks, mask))
    rows = np.flatnonzero(is_decode)
    if rows.size and not group_decodes:
        width = int(-(-seq_lens[rows].max() // bs))
        plan.decode_rows = DecodeRows(qsl[rows], np.ascontiguousarray(meta.block_tables_cpu[rows, :width], np.int64),
                                      seq_lens[rows])
    elif rows.size:
        ctx_all = seq_lens[rows]
        split_cost = GROUP_SPLIT_ELEMENTS / (bs * num_kv_heads * head_dim)
        groups = group_by_length(-(-ctx_all // bs), split_cost)
        plan.decode_idx = torch.from_numpy(qsl[rows[np.concatenate(groups)]]).to(dev, non_blocking=True)
        for group in groups:
            sel, ctx = rows[group], ctx_all[group]
            nb = int(-(-ctx.max() // bs))
            width = nb * bs
            tables = np.ascontiguousarray(meta.block_tables_cpu[sel, :nb], dtype=np.int64).reshape(-1)
            mask = torch.from_numpy(np.arange(width)[None, :] < ctx[:, None]).view(sel.size, 1, 1, width)
            plan.decode_groups.append(DecodeGroup(
                size=int(sel.size), kv_blocks=torch.from_numpy(tables).to(dev, non_blocking=True),
                mask=mask.to(dev, non_blocking=True)))
    return plan


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V ([T, KVH, D] each) at their slots of the cache (in place)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _attend_prefills(q, k, v, k_blocks, v_blocks, prefills: list[PrefillChunk], out, scale: float) -> None:
    """SDPA over each prefill chunk (causal; after its gathered context when it has one), into ``out``."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    for chunk in prefills:
        s, n = chunk.q_start, chunk.q_len
        qs = q[s:s + n].transpose(0, 1).unsqueeze(0)
        if chunk.mask is None:
            ks = k[s:s + n].transpose(0, 1).unsqueeze(0)
            vs = v[s:s + n].transpose(0, 1).unsqueeze(0)
        else:
            ks = k_blocks.index_select(0, chunk.kv_blocks).view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
            vs = v_blocks.index_select(0, chunk.kv_blocks).view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale, enable_gqa=True
        )
        out[s:s + n] = o[0].transpose(0, 1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attend each query over its sequence's context with SDPA (the cache already holds this step's K/V).

    Args/returns: as :func:`paged_attention`.
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    plan = meta.reference_plan(num_kv_heads, head_dim)
    # Whole-block gathers with index_select over [num_blocks, block elements] views: on CPU
    # about 7x faster than advanced indexing (k_cache[table]) for the same copy.
    k_blocks = k_cache.view(k_cache.shape[0], -1)
    v_blocks = v_cache.view(v_cache.shape[0], -1)
    out = torch.empty_like(q)
    _attend_prefills(q, k, v, k_blocks, v_blocks, plan.prefills, out, scale)
    if plan.decode_groups:
        # One gather of the decode queries in group order, one scatter of the results.
        q_all = q.index_select(0, plan.decode_idx).unsqueeze(2)
        outs = []
        a = 0
        for group in plan.decode_groups:
            n = group.size
            kd = k_blocks.index_select(0, group.kv_blocks).view(n, -1, num_kv_heads, head_dim).permute(0, 2, 1, 3)
            vd = v_blocks.index_select(0, group.kv_blocks).view(n, -1, num_kv_heads, head_dim).permute(0, 2, 1, 3)
            outs.append(F.scaled_dot_product_attention(q_all[a:a + n], kd, vd, attn_mask=group.mask, scale=scale,
                                                       enable_gqa=True))
            a += n
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        out.index_copy_(0, plan.decode_idx, o[:, :, 0])
    return out


def cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The ``cpu`` backend: prefill chunks as the reference, decode rows through the Numba kernel
    (:func:`kubeinfer_serving.layers.paged_attention_cpu.decode_attention_cpu`, one thread), which
    reads the cache in place. float32 CPU tensors; the cache already holds this step's K/V.

    Args/returns: as :func:`paged_attention`.
    """
    from .paged_attention_cpu import decode_attention_cpu

    plan = meta.cpu_plan()
    q = q.contiguous()
    out = torch.empty_like(q)
    _attend_prefills(q, k, v, k_cache.view(k_cache.shape[0], -1), v_cache.view(v_cache.shape[0], -1),
                     plan.prefills, out, scale)
    if plan.decode_rows is not None:
        d = plan.decode_rows
        decode_attention_cpu(q, k_cache, v_cache, d.q_rows, d.block_tables, d.seq_lens, out, scale)
    return out


@functools.cache
def cpu_kernel_available() -> bool:
    """True when the ``cpu`` backend's Numba kernel imports (Numba is a dependency; when it is
    missing, or its on-disk cache has no writable place, that is logged once and the reference
    serves instead)."""
    try:
        from . import paged_attention_cpu  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or Numba's RuntimeError for an unusable cache
        log.warning("the CPU decode attention kernel is unavailable (%s): the reference path serves", exc)
        return False
    return True


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend :func:`paged_attention` runs for tensors on ``device`` of ``dtype``:
    ``"triton"``, ``"cpu"`` or ``"reference"`` (see the module docstring)."""
    if use_triton(device):
        return "triton"
    if (device.type == "cpu" and os.environ.get(BACKEND_ENV, "") != "reference" and dtype == torch.float32
            and torch.get_num_threads() == 1 and cpu_kernel_available()):
        return "cpu"
    return "reference"


def use_triton(device: torch.device) -> bool:
    """True when :func:`paged_attention` runs the Triton kernel for tensors on ``device``."""
    choice = os.environ.get(BACKEND_ENV, "")
    if choice in ("triton", "reference"):
        return choice == "triton"
    return device.type == "cuda"


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend each query over its sequence's context.

    Args:
        q: [T, H, D] queries (RoPE applied).
        k, v: [T, KVH, D] this step's keys (RoPE applied) and values; H % KVH == 0 (GQA).
        k_cache, v_cache: [num_blocks, block_size, KVH, D], updated in place.
        meta: see :class:`AttentionMetadata`.
        scale: softmax scale, usually head_dim ** -0.5.

    Returns:
        [T, H, D] attention output, dtype of ``q``.
    """
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    backend = attention_backend(q.device, q.dtype)
    if backend == "triton":
        from .paged_attention_triton import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, meta, scale)
    if backend == "cpu":
        return cpu_attention(q, k, v, k_cache, v_cache, meta, scale)
    return reference_attention(q, k, v, k_cache, v_cache, meta, scale)
