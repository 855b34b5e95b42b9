"""CUDA graphs for decode steps: capture the model forward once per batch-size bucket, replay it.

A decode step of a 1B model launches a few hundred small kernels; from Python each launch costs
microseconds of host time, more than the kernels take at small batches. A CUDA graph replays
the whole forward with one launch (the technique of vLLM's ``CUDAGraphRunner``; this is our own
code, written from the description).

Policy (as vLLM's default):

* **Buckets**: 1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (and
  ``max_num_seqs`` itself), capped at :data:`MAX_CAPTURE_SIZE` (:func:`capture_sizes`).
* **Replay** for steps whose every row is one query token (pure decode; a one-token prompt or
  prefill chunk counts too) and whose row count fits a bucket: the step runs the smallest
  bucket >= its rows (:func:`pick_bucket`), the extra rows padded (:func:`pack_decode_inputs`).
* **Eager** for everything else: prefill chunks, mixed prefill/decode steps, batches larger
  than the largest bucket.
* **Off** with ``EngineConfig.enforce_eager`` (vLLM's ``enforce_eager``) or the pod-wide
  ``KUBEINFER_CUDA_GRAPHS=0``; also off unless the forward runs wholly in Triton kernels (the
  Triton attention backend and the fused kernels: the reference SDPA path plans on the host
  per step and cannot be captured), and off on CPU. A capture that fails logs a warning and
  leaves the engine eager (graphs are an optimisation; the model still loads).

Static inputs: one int64 device buffer holds, for a bucket of ``b`` rows and a block-table width
of ``W`` blocks: input ids [b] | positions [b] | slot mapping [b] | query_start_loc [b + 1] |
seq_lens [b] | block tables [b, W], and with LoRA slots | each row's adapter slot [b] (-1: the
base model). Each bucket's graph was captured reading views at those
offsets; a replay packs the step on the host into a pinned buffer of the same layout and copies
it up in one transfer. Padded rows decode token 0 at position 0 with a context of one token
whose K/V live in the **null block**, one block past the pool that the block manager never
hands out, so padded rows never touch a sequence's cache.

**LoRA** (an engine with adapter slots, :mod:`kubeinfer_serving.lora`): the graphs are captured
with the LoRA updates of every targeted module (the Triton shrink/expand kernels of
:mod:`kubeinfer_serving.lora.triton_ops`, which read each row's slot from a device tensor and skip
rows of slot -1). The per-row slot indexes are the static buffer's last part and the slot pool's
A/B tensors are allocated once and only ever written in place (:meth:`LoRASlots.write`), so one
graph per bucket replays any mix of adapters and base rows, including adapters that took a slot
after the capture. Padded rows get slot -1. Base-only steps replay the same graphs (their rows
all -1: the LoRA kernels return at once), as vLLM's LoRA graphs do.

Sampling is never captured: the sampler runs eagerly on the replayed hidden states (see
:mod:`kubeinfer_serving.engine.sampler` for seeded requests).
"""

from __future__ import annotations

import bisect
import os

import numpy as np
import torch

from kubeinfer_serving.layers.activation_norm import use_fused
from kubeinfer_serving.layers.attention import AttentionMetadata, use_triton
from kubeinfer_serving.lora.slots import LoRASlots, LoRAStep

from .staging import HostToDevice

#: Largest batch a decode graph is captured for (vLLM's default ``max_cudagraph_capture_size``).
MAX_CAPTURE_SIZE = 512
#: Environment switch: "0" turns decode graphs off pod-wide.
GRAPHS_ENV = "KUBEINFER_CUDA_GRAPHS"


def capture_sizes(max_num_seqs: int, limit: int = MAX_CAPTURE_SIZE) -> list[int]:
    """Batch-size buckets to capture: 1, 2, 4, then multiples of 8, plus ``max_num_seqs`` itself.

    Args:
        max_num_seqs: the engine's batch cap (>= 1).
        limit: largest bucket.

    Returns:
        ascending sizes, all <= min(max_num_seqs, limit).
    """
    top = min(max_num_seqs, limit)
    sizes = {s for s in (1, 2, 4) if s <= top} | set(range(8, top + 1, 8)) | {top}
    return sorted(sizes)


def pick_bucket(num_rows: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding ``num_rows`` rows, or None when the step is larger than every bucket."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) else None


def layout(bucket: int, width: int, lora: bool = False) -> list[int]:
    """Start offsets of the static buffer's parts for ``bucket`` rows and block-table width ``width``:
    ids, positions, slots, query_start_loc, seq_lens, block tables, [with ``lora``: adapter slots,] end."""
    sizes = (bucket, bucket, bucket, bucket + 1, bucket, bucket * width) + ((bucket,) if lora else ())
    return np.cumsum((0,) + sizes).tolist()


def pack_decode_inputs(
    out: np.ndarray,
    bucket: int,
    width: int,
    input_ids: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    seq_lens: np.ndarray,
    block_tables: np.ndarray,
    null_block: int,
    block_size: int,
    row_slots: np.ndarray | None = None,
    lora: bool = False,
) -> None:
    """Pack a decode step of n rows, padded to ``bucket`` rows, in the layout of :func:`layout`.

    Args:
        out: int64 host buffer of at least ``layout(bucket, width)[-1]`` elements (filled in place).
        bucket: rows of the graph (>= n).
        width: block-table width the graphs were captured with (>= the step's table width).
        input_ids, positions, slots, seq_lens: [n] int64 per-row values of the step (one token per row).
        block_tables: [n, w] int64 block tables (w <= width).
        null_block: the pool's block reserved for padded rows.
        block_size: tokens per block.
        row_slots: [n] int64 LoRA slot of each row (-1: none); None: every row -1. Only with ``lora``.
        lora: the layout has the adapter-slot part (``layout(..., lora=True)``); padded rows get -1.

    Raises:
        ValueError: more rows than ``bucket``, a wider block table than ``width``, or
            ``row_slots`` without ``lora``.
    """
    n = len(input_ids)
    w = block_tables.shape[1] if block_tables.ndim == 2 else 0
    if n > bucket or w > width:
        raise ValueError(f"a step of {n} rows x {w} blocks does not fit bucket {bucket} x {width}")
    if row_slots is not None and not lora:
        raise ValueError("row_slots given for a layout without LoRA slots")
    o = layout(bucket, width, lora)
    ids, pos, sl, qsl, lens = (out[o[i]:o[i + 1]] for i in range(5))
    table = out[o[5]:o[6]].reshape(bucket, width)
    ids[:n], ids[n:] = input_ids, 0
    pos[:n], pos[n:] = positions, 0
    sl[:n], sl[n:] = slots, null_block * block_size
    qsl[:] = np.arange(bucket + 1)
    lens[:n], lens[n:] = seq_lens, 1
    table[:] = null_block
    if w:
        table[:n, :w] = block_tables
    if lora:
        adapters = out[o[6]:o[7]]
        adapters[:n] = -1 if row_slots is None else row_slots
        adapters[n:] = -1


def graphs_enabled(device: torch.device, enforce_eager: bool) -> bool:
    """True when decode steps on ``device`` may run as CUDA graphs (see the module's policy)."""
    if device.type != "cuda" or enforce_eager or os.environ.get(GRAPHS_ENV, "1") == "0":
        return False
    return use_triton(device) and use_fused(device)


def decode_graph_sizes(device: torch.device, enforce_eager: bool, max_num_seqs: int) -> list[int] | None:
    """The buckets an engine on ``device`` captures (:func:`capture_sizes`), or None when graphs are off
    (:func:`graphs_enabled`)."""
    return capture_sizes(max_num_seqs) if graphs_enabled(device, enforce_eager) else None


class DecodeGraphs:
    """Captured decode forwards, one per bucket, over shared static inputs and one memory pool.

    Args:
        model: the model (``forward(input_ids, positions, kv_caches, meta) -> [T, hidden]``).
        kv_caches: the pool, per layer (k, v) of [num_blocks + 1, block_size, KVH, D]; the last
            block is the null block.
        sizes: buckets (:func:`capture_sizes`).
        width: block-table width, ``ceil(max_model_len / block_size)``.
        block_size: tokens per block.
        device: a CUDA device.
        lora_slots: the engine's LoRA slot pool, or None (LoRA off): with it every graph applies
            each row's adapter, its slot read from the static inputs (see the module docstring).

    :meth:`capture` must run before :meth:`replay`; it writes only into the null block.
    :meth:`run_padded` runs a step on the same padded static inputs without a graph (any
    device: it is what gets captured, and what the CPU tests check against the eager path).
    """

    def __init__(self, model, kv_caches, sizes: list[int], width: int, block_size: int,
                 device: torch.device, lora_slots: LoRASlots | None = None) -> None:
        self.model = model
        self.lora_slots = lora_slots
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        self.width = width
        self.block_size = block_size
        self.device = device
        self.null_block = kv_caches[0][0].shape[0] - 1
        n = layout(self.sizes[-1], width, self.lora)[-1]
        self.static = torch.zeros(n, dtype=torch.int64, device=device)
        # Pinned double-buffered staging; packing waits until the buffer's previous upload has
        # been read (a step that samples nothing never synchronises the host).
        self._inputs_to_device = HostToDevice(device, initial=n)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        #: steps replayed so far (for tests and statistics).
        self.num_replays = 0
        self._pool = None  # the graphs' private memory pool id, set by capture()

    @property
    def lora(self) -> bool:
        """Whether the graphs apply LoRA adapters (the static inputs carry each row's slot)."""
        return self.lora_slots is not None

    def _lora_step(self, bucket: int, row_slots: np.ndarray | None) -> LoRAStep | None:
        """The LoRA mapping of a padded step of ``bucket`` rows: on CUDA the Triton step reading the
        static buffer's adapter-slot view (what the graphs capture); elsewhere (CPU tests of the
        padded forward) a host-grouped step over the same padded slots. None without LoRA."""
        if not self.lora:
            return None
        if self.device.type == "cuda":
            o = layout(bucket, self.width, True)
            return LoRAStep.on_device(self.lora_slots, self.static[o[6]:o[7]])
        padded = np.full(bucket, -1, np.int64)
        if row_slots is not None:
            padded[:len(row_slots)] = row_slots
        return LoRAStep(self.lora_slots, padded, self.device)

    def _views(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        o = layout(bucket, self.width, self.lora)
        s = self.static
        meta = AttentionMetadata(
            slot_mapping=s[o[2]:o[3]], query_start_loc=s[o[3]:o[4]], seq_lens=s[o[4]:o[5]],
            block_tables=s[o[5]:o[6]].view(bucket, self.width), max_query_len=1,
            max_seq_len=self.width * self.block_size, query_start_loc_cpu=np.arange(bucket + 1),
            seq_lens_cpu=np.ones(bucket, np.int64), block_tables_cpu=np.zeros((bucket, 0), np.int64),
            block_size=self.block_size,
        )
        return s[o[0]:o[1]], s[o[1]:o[2]], meta

    def _upload(self, bucket: int, ids, positions, slots, seq_lens, tables, row_slots=None) -> None:
        end = layout(bucket, self.width, self.lora)[-1]
        host = self._inputs_to_device.host_buffer(end)
        pack_decode_inputs(host.numpy()[:end], bucket, self.width, ids, positions, slots, seq_lens, tables,
                           self.null_block, self.block_size, row_slots, self.lora)
        self._inputs_to_device.upload(host[:end], out=self.static[:end])

    @torch.inference_mode()
    def run_padded(self, bucket: int, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                   seq_lens: np.ndarray, tables: np.ndarray, row_slots: np.ndarray | None = None) -> torch.Tensor:
        """Pack a step padded to ``bucket`` rows into the static inputs and run the model on them eagerly.

        Args: as :meth:`replay`. Returns: [n, hidden] (the step's rows; padding dropped).
        """
        self._upload(bucket, ids, positions, slots, seq_lens, tables, row_slots)
        ids_v, pos_v, meta = self._views(bucket)
        if self.device.type == "cpu":  # the CPU attention backend reads the host copies: the padded ones
            meta.seq_lens_cpu = meta.seq_lens.numpy()
            meta.block_tables_cpu = meta.block_tables.numpy()
        return self.model(ids_v, pos_v, self.kv_caches, meta, None, self._lora_step(bucket, row_slots))[:len(ids)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs then reuse the pool's memory).

        Each bucket runs twice eagerly first (Triton compiles its kernels, the allocator warms
        up), then once under capture. All rows are padding, so only the null block is written.
        """
        pool = self._pool = torch.cuda.graph_pool_handle()
        empty = np.zeros(0, np.int64)
        for bucket in reversed(self.sizes):
            for _ in range(2):
                self.run_padded(bucket, empty, empty, empty, empty, np.zeros((0, 0), np.int64))
            ids, pos, meta = self._views(bucket)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            lora = self._lora_step(bucket, None)  # reads the static slots: all -1 now, any mix at replay
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(ids, pos, self.kv_caches, meta, None, lora)
            self._graphs[bucket] = (graph, out)
        torch.cuda.synchronize(self.device)

    def memory_bytes(self) -> int:
        """Device bytes the captured graphs hold: the segments of their private memory pool
        (``torch.cuda.memory_snapshot`` filtered by the pool's id, as torch's own cudagraph trees
        do) plus the static input buffer; only the static buffer before :meth:`capture` or off CUDA.
        """
        static = self.static.numel() * self.static.element_size()
        if self.device.type != "cuda" or self._pool is None:
            return static
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pool = tuple(self._pool)
        return static + sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                            if seg.get("device") == index and tuple(seg.get("segment_pool_id", ())) == pool)

    def bucket_for(self, num_rows: int) -> int | None:
        """The bucket a pure-decode step of ``num_rows`` rows replays, or None (run it eagerly)."""
        return pick_bucket(num_rows, self.sizes)

    def replay(self, bucket: int, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
               seq_lens: np.ndarray, tables: np.ndarray, row_slots: np.ndarray | None = None) -> torch.Tensor:
        """Run a pure-decode step of n rows on ``bucket``'s graph.

        Args: the step's host arrays as :func:`pack_decode_inputs` takes them (``row_slots``: each
            row's LoRA slot, -1 for none; only for graphs with LoRA slots).

        Returns:
            [n, hidden] final hidden states; a view into the graphs' memory pool, valid until
            the next replay.
        """
        self._upload(bucket, ids, positions, slots, seq_lens, tables, row_slots)
        graph, out = self._graphs[bucket]
        graph.replay()
        self.num_replays += 1
        return out[:len(ids)]
