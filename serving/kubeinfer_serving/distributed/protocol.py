"""The messages rank 0 sends its workers: a fixed-size header, then (for a step) one payload.

Both travel as int64 CPU tensors broadcast over the group's gloo control group (two broadcasts
per step; no pickling). Header fields (:data:`HEADER_LEN` int64):

``[op, num_tokens, num_samples, num_seqs, max_nb, keep, n_calls, calls_total, arg]``

* ``OP_INIT``: ``arg`` = the KV pool size in blocks; field 1 = the number of decode CUDA graph
  buckets (0: no graphs), field 4 = the graphs' block-table width. With buckets, an int64 tensor of
  them follows (:func:`init_messages`); each rank allocates its pool (plus the null block with
  graphs) and captures the same buckets in the same order as rank 0 (their warm-up steps and
  captures hold the same collectives), then the ranks gather their reports on rank 0
  (``[weights bytes, KV bytes, load error, graphs captured, graph bytes]``, :data:`REPORT_LEN`).
* ``OP_REPLAY``: a pure-decode step that rank 0 replays on bucket ``arg``'s graph: field 1 = rows n,
  field 4 = the block-table width of the step, fields 6-7 the logits calls; a payload of
  ``ids | positions | slots | seq lens | tables (n x width) | call lengths | call rows`` follows
  (:func:`encode_replay`); every rank pads it into its static inputs and replays its own graph.
* ``OP_STEP``: a payload of ``buffer | call lengths | call rows`` follows: ``buffer`` is the step's
  packed input buffer (:func:`kubeinfer_serving.engine.model_runner.buffer_sizes` gives its parts);
  ``keep`` 1 when the last layer keeps only the logits rows; the calls are the row sets, in order,
  whose logits the step computes (each a collective gather on rank 0).
* ``OP_STOP``: the workers exit.
"""

from __future__ import annotations

import numpy as np
import torch

from kubeinfer_serving.engine.model_runner import StepInputs, buffer_sizes

OP_INIT, OP_STEP, OP_STOP, OP_REPLAY = 1, 2, 3, 4
HEADER_LEN = 9
#: int64 fields of a rank's report after ``OP_INIT``.
REPORT_LEN = 5


def header(op: int, *, arg: int = 0) -> torch.Tensor:
    """A header with no step fields (``OP_INIT`` without graphs, ``OP_STOP``)."""
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0], h[8] = op, arg
    return h


def init_messages(num_blocks: int, graph_sizes: list[int] | None, width: int) -> list[torch.Tensor]:
    """The ``OP_INIT`` broadcasts: the header, then the graph buckets when there are any."""
    h = header(OP_INIT, arg=num_blocks)
    if not graph_sizes:
        return [h]
    h[1], h[4] = len(graph_sizes), width
    return [h, torch.tensor(graph_sizes, dtype=torch.int64)]


def encode_replay(bucket: int, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
                  tables: np.ndarray, calls: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) of a pure-decode step of ``n = len(ids)`` rows replayed on ``bucket``.

    Args: the step's host arrays as :meth:`~kubeinfer_serving.engine.cuda_graphs.DecodeGraphs.replay`
        takes them (``tables``: [n, width] block ids); ``calls``: the logits calls' rows, in order.
    """
    n = len(ids)
    tables = np.asarray(tables, np.int64).reshape(n, -1)
    lens = [len(c) for c in calls]
    h = torch.tensor([OP_REPLAY, n, 0, 0, tables.shape[1], 0, len(calls), sum(lens), bucket], dtype=torch.int64)
    parts = [ids, positions, slots, seq_lens, tables.ravel(), np.asarray(lens, np.int64), *calls]
    payload = np.concatenate([np.asarray(p, np.int64).ravel() for p in parts]) if n else np.zeros(0, np.int64)
    return h, torch.from_numpy(payload)


def replay_payload_len(h: torch.Tensor) -> int:
    """Elements of the payload that follows replay header ``h``."""
    n, width, n_calls, total = int(h[1]), int(h[4]), int(h[6]), int(h[7])
    return 4 * n + n * width + n_calls + total


def decode_replay(h: torch.Tensor, payload: np.ndarray) -> tuple[int, tuple[np.ndarray, ...], list[np.ndarray]]:
    """(bucket, (ids, positions, slots, seq_lens, tables [n, width]), the logits calls' rows) of a replay."""
    n, width, n_calls = int(h[1]), int(h[4]), int(h[6])
    ids, positions, slots, seq_lens = (payload[i * n:(i + 1) * n] for i in range(4))
    at = 4 * n + n * width
    tables = payload[4 * n:at].reshape(n, width)
    lens = payload[at:at + n_calls]
    bounds = np.cumsum(np.concatenate([[at + n_calls], lens])).astype(np.int64)
    return int(h[8]), (ids, positions, slots, seq_lens, tables), [payload[bounds[i]:bounds[i + 1]]
                                                                  for i in range(n_calls)]


def encode_step(inputs: StepInputs, keep: bool, calls: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) of a step: its packed buffer, whether the last layer keeps only the logits
    rows, and the logits calls' row indexes (into the forward's output rows)."""
    num_tokens, num_samples, num_seqs, max_nb = inputs.counts
    n = sum(buffer_sizes(num_tokens, num_samples, num_seqs, max_nb))
    lens = [len(c) for c in calls]
    h = torch.tensor([OP_STEP, num_tokens, num_samples, num_seqs, max_nb, int(keep), len(calls), sum(lens), 0],
                     dtype=torch.int64)
    payload = np.empty(n + len(calls) + sum(lens), np.int64)
    payload[:n] = inputs.packed[:n]
    payload[n:n + len(calls)] = lens
    if calls:
        payload[n + len(calls):] = np.concatenate(calls)
    return h, torch.from_numpy(payload)


def payload_len(h: torch.Tensor) -> int:
    """Elements of the payload that follows step header ``h``."""
    num_tokens, num_samples, num_seqs, max_nb, _, n_calls, total = (int(x) for x in h[1:8])
    return sum(buffer_sizes(num_tokens, num_samples, num_seqs, max_nb)) + n_calls + total


def decode_calls(h: torch.Tensor, payload: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the packed input buffer, the logits calls' row indexes) of a step payload."""
    num_tokens, num_samples, num_seqs, max_nb, _, n_calls, _ = (int(x) for x in h[1:8])
    n = sum(buffer_sizes(num_tokens, num_samples, num_seqs, max_nb))
    lens = payload[n:n + n_calls]
    bounds = np.cumsum(np.concatenate([[n + n_calls], lens]))
    return payload[:n], [payload[bounds[i]:bounds[i + 1]] for i in range(n_calls)]
