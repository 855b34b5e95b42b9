"""The messages rank 0 sends its workers: a fixed-size header, then (for a step) one payload.

Both travel as int64 CPU tensors broadcast over the group's gloo control group (two broadcasts
per step; no pickling). Header fields (:data:`HEADER_LEN` int64):

``[op, num_tokens, num_samples, num_seqs, max_nb, keep, n_calls, calls_total, arg]``

* ``OP_INIT``: ``arg`` = the KV pool size in blocks; each rank allocates its pool, then the ranks
  gather their byte counts on rank 0 (:func:`report`).
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

OP_INIT, OP_STEP, OP_STOP = 1, 2, 3
HEADER_LEN = 9


def header(op: int, *, arg: int = 0) -> torch.Tensor:
    """A header with no step fields (``OP_INIT``, ``OP_STOP``)."""
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0], h[8] = op, arg
    return h


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
