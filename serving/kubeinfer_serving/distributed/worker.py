"""A tensor-parallel worker process (ranks 1..N-1): load this rank's shard, then follow rank 0's steps.

Started by :class:`~kubeinfer_serving.distributed.executor.TPExecutor` with
``torch.multiprocessing``'s spawn start method. The worker:

1. exits when its parent process is gone (a watcher thread polls the parent pid: the kernel's
   ``PR_SET_PDEATHSIG`` would fire when the *thread* that spawned it ends, e.g. a loader thread),
   ignores SIGINT (the serving process decides when workers stop), connects to the group;
2. loads its shard of the weights (safetensors slices), quantizes/packs as rank 0 does; a failure
   is written to the store (``error/RANK``) and reported at the init handshake;
3. on ``OP_INIT`` allocates its KV pool (same block count as rank 0, its own KV heads), captures
   the decode CUDA graph buckets rank 0 sent (on CUDA; the same buckets in the same order, so the
   NCCL all-reduces inside them line up) and reports its weight, KV and graph bytes;
4. on each ``OP_STEP`` rebuilds the step's inputs from the payload, runs the forward and the step's
   logits calls (the collectives rank 0 runs), and discards the results; on each ``OP_REPLAY``
   pads the step into its graphs' static inputs and replays its graph of the same bucket (off
   CUDA: the same padded inputs run eagerly), then the logits calls;
5. exits on ``OP_STOP``, or with an error when a collective fails (rank 0 gone).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from .group import IDLE_TIMEOUT_S, Rendezvous, TPGroup
from .protocol import (
    HEADER_LEN,
    OP_INIT,
    OP_REPLAY,
    OP_STEP,
    OP_STOP,
    REPORT_LEN,
    decode_calls,
    decode_replay,
    payload_len,
    replay_payload_len,
)

log = logging.getLogger(__name__)
#: Seconds between checks that the serving process (the parent) still runs.
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard (picklable; sent at spawn).

    Attributes:
        model_dir: the model directory or ``.gguf`` file.
        dtype: weights/KV dtype; device_type: ``cpu`` or ``cuda`` (rank r uses ``cuda:first_device+r``).
        max_positions: RoPE table length (the engine's max_model_len).
        block_size: tokens per KV block; quantization: as :class:`~kubeinfer_serving.engine.config.EngineConfig`.
        num_threads: torch intra-op threads per rank.
        timeout_s: limit of one collective inside a step, seconds.
        first_device: CUDA index of rank 0's GPU (the registry's placement); ignored on CPU.
    """

    model_dir: str
    dtype: torch.dtype
    device_type: str
    max_positions: int
    block_size: int
    quantization: str
    num_threads: int
    timeout_s: float
    first_device: int = 0


def rank_device(device_type: str, rank: int, first_device: int = 0) -> torch.device:
    """The device of ``rank``: ``cuda:first_device+rank`` on CUDA (one GPU per rank), else the CPU."""
    return torch.device("cuda", first_device + rank) if device_type == "cuda" else torch.device("cpu")


def build_rank_model(model_dir: str, hf_config, spec: WorkerSpec, group: TPGroup):
    """Build this rank's shard of the model and load its weights (slices only); quantize and pack
    as :meth:`~kubeinfer_serving.engine.llm_engine.LLMEngine.from_weights` does.

    Raises:
        kubeinfer_serving.models.loader.ModelLoadError, kubeinfer_serving.models.llama.WeightLoadError:
            unreadable or mismatched weights.
    """
    from kubeinfer_serving.engine.llm_engine import check_finite_weights
    from kubeinfer_serving.layers.linear import pack_linear_layers
    from kubeinfer_serving.layers.quant import quantize_linear_layers
    from kubeinfer_serving.models.llama import LlamaForCausalLM

    from .sharding import iter_rank_weights

    model = LlamaForCausalLM(hf_config, max_positions=spec.max_positions, dtype=spec.dtype, device=group.device,
                             tp=group)
    model.load_weights(iter_rank_weights(model_dir, model.shard, spec.dtype))
    model.eval()
    check_finite_weights(model)
    quantize_linear_layers(model, spec.quantization)
    pack_linear_layers(model)
    return model


def _load_config(model_dir: str):
    from kubeinfer_serving.models import gguf, loader

    if gguf.is_gguf(model_dir):
        return gguf.read_gguf(model_dir).hf_config
    return loader.load_hf_config(model_dir)


def _exit_with_parent(parent: int) -> None:
    """Exit the process (status 1) once ``parent`` is no longer this process's parent."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def worker_main(rank: int, size: int, rdv: Rendezvous, spec: WorkerSpec) -> None:
    """The worker's entry point (see the module docstring). Exits the process with 0 on ``OP_STOP``."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s")
    torch.set_num_threads(spec.num_threads)
    device = rank_device(spec.device_type, rank, spec.first_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = TPGroup.connect_store(rdv, size, spec.timeout_s)
    group = TPGroup(rank, size, device, store, spec.timeout_s)
    model, error = None, ""
    try:
        model = build_rank_model(spec.model_dir, _load_config(spec.model_dir), spec, group)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0 at the handshake
        log.exception("loading the shard failed")
        error = f"{type(exc).__name__}: {exc}"
        store.set(f"error/{rank}", error)
    sys.exit(_serve(group, model, spec, error))


def _serve(group: TPGroup, model, spec: WorkerSpec, error: str) -> int:
    """The handshake and the step loop; returns the exit status."""
    from kubeinfer_serving.engine.model_runner import ModelRunner, step_inputs_from_buffer

    runner = None
    with torch.inference_mode():
        while True:
            h = group.broadcast_host(torch.zeros(HEADER_LEN, dtype=torch.int64), timeout_s=IDLE_TIMEOUT_S)
            op = int(h[0])
            if op == OP_STOP:
                return 0
            if op == OP_INIT:
                sizes = None
                if int(h[1]):
                    sizes = group.broadcast_host(torch.empty(int(h[1]), dtype=torch.int64)).tolist()
                if not error:
                    runner = ModelRunner(model, int(h[8]), spec.block_size, group.device, cuda_graph_sizes=sizes,
                                         max_model_len=int(h[4]) * spec.block_size if sizes else None)
                graphs = runner.graphs if runner is not None else None
                report = torch.tensor([_weights_bytes(model) if not error else 0,
                                       runner.kv_cache_bytes if runner is not None else 0, int(bool(error)),
                                       int(graphs is not None), graphs.memory_bytes() if graphs is not None else 0])
                assert report.numel() == REPORT_LEN
                group.gather_host(report)
                if error:
                    return 1
                continue
            if op == OP_REPLAY:
                payload = group.broadcast_host(torch.empty(replay_payload_len(h), dtype=torch.int64))
                bucket, arrays, calls = decode_replay(h, payload.numpy())
                run = runner.graphs.replay if group.device.type == "cuda" else runner.graphs.run_padded
                hidden = run(bucket, *arrays)
                for rows in calls:
                    model.compute_logits(hidden.index_select(0, torch.from_numpy(rows).to(group.device)))
                continue
            if op != OP_STEP:
                raise RuntimeError(f"unknown tensor-parallel op {op}")
            payload = group.broadcast_host(torch.empty(payload_len(h), dtype=torch.int64))
            packed, calls = decode_calls(h, payload.numpy())
            dev = torch.from_numpy(packed)
            if group.device.type != "cpu":
                dev = dev.to(group.device)
            num_tokens, num_samples, num_seqs, max_nb = (int(x) for x in h[1:5])
            inputs = step_inputs_from_buffer(packed, dev, num_tokens, num_samples, num_seqs, max_nb, spec.block_size)
            keep = inputs.logits_idx if int(h[5]) else None
            hidden = model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta, keep, None)
            for rows in calls:
                model.compute_logits(hidden.index_select(0, torch.from_numpy(rows).to(group.device)))


def _weights_bytes(model) -> int:
    from kubeinfer_serving.engine.llm_engine import weight_bytes

    return weight_bytes(model)
