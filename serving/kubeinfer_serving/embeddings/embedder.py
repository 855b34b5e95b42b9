"""The embedding runner: a sentence-transformers encoder that batches concurrent callers.

Each :meth:`Embedder.embed` call tokenises its inputs in a worker thread (so a too-long input
fails before any forward, and the event loop never waits for a tokenizer) and queues them. One
batcher task builds each forward of at most ``max_batch_size`` sequences round-robin across the
queued callers (one row from each in turn, each caller's rows in length order to limit padding),
runs it on a single worker thread, pools (:mod:`.pooling`), and hands a caller its vectors once
all its rows are done. So a caller with 10,000 inputs shares every forward with a caller of one
input instead of making it wait for all 10,000 (fair dynamic batching, as in Triton/TEI), and a
caller that goes away (its ``embed`` is cancelled) stops costing forwards at the next one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from kubeinfer_serving.embeddings.pooling import PoolingConfig, pool, read_pooling_config
from kubeinfer_serving.engine.config import pick_device, torch_dtype
from kubeinfer_serving.engine.validation import outside_vocabulary
from kubeinfer_serving.models.loader import ModelLoadError, load_tokenizer, weights_nbytes


@dataclass
class _Job:
    """One caller's rows: ``order`` is the row order (by length), ``next`` the first row not yet run."""

    ids: list[list[int]]
    future: asyncio.Future = field(repr=False)
    out: np.ndarray | None = field(default=None, repr=False)
    order: list[int] = field(default_factory=list)
    next: int = 0
    done_rows: int = 0


class Embedder:
    """Turns texts (or token-id lists) into sentence embeddings with one encoder model.

    Args:
        model: a Hugging Face encoder (``transformers.AutoModel``), already on ``device``, in eval mode.
        tokenizer: its tokenizer.
        pooling: pooling mode / normalisation / max sequence length.
        device: where ``model`` lives.
        max_batch_size: most sequences in one forward.
        name: model name for thread names and messages.

    Attributes:
        dim: embedding size (floats per vector).
        is_matryoshka, matryoshka_dimensions: whether the model was trained so that a prefix of
            its vector is an embedding too (``is_matryoshka`` / ``matryoshka_dimensions`` in its
            ``config.json``, as vLLM reads them), and the prefix sizes it names (None: any).
        max_model_len: most tokens per input, special tokens included.
        num_forwards: forwards run so far (a batching counter tests can read).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        pooling: PoolingConfig,
        *,
        device: torch.device,
        max_batch_size: int = 64,
        name: str = "embed",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.device = device
        self.name = name
        self.max_batch_size = max_batch_size
        cfg = model.config
        limits = [n for n in (pooling.max_seq_length, getattr(cfg, "max_position_embeddings", None)) if n]
        self.max_model_len = int(min(limits)) if limits else 512
        self.dim = int(cfg.hidden_size)
        dims = getattr(cfg, "matryoshka_dimensions", None)
        self.matryoshka_dimensions: tuple[int, ...] | None = tuple(int(d) for d in dims) if dims else None
        self.is_matryoshka = bool(getattr(cfg, "is_matryoshka", False) or dims)
        self._raw_pooling = replace(pooling, normalize=False)
        self.num_forwards = 0
        self._uses_token_types = getattr(cfg, "type_vocab_size", 0) > 0
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prefix, self._suffix = self._special_wrapping()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"embed-{name}")
        self._tokenizer_lock = threading.Lock()
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    def from_model_dir(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 64,
        name: str = "embed",
        host_model: torch.nn.Module | None = None,
    ) -> Embedder:
        """Load a sentence-transformers (or plain Hugging Face encoder) directory. Blocking: call in a thread.

        Args:
            path: the model directory (``config.json``, ``*.safetensors``, tokenizer, optional ``modules.json``).
            device: default CUDA when available, else CPU.
            dtype: "auto"/None = float32, or float32 / bfloat16 / float16.
            host_model: the model from :meth:`offload` of an earlier load (the warm tier): moved
                to ``device`` instead of reading the weights from disk.

        Raises:
            ModelLoadError: missing/corrupt files; UnsupportedModelError: unsupported pipeline modules.
        """
        dev = pick_device(device)
        weights_dtype = torch.float32 if dtype in (None, "auto") else torch_dtype(dtype, dev)
        pooling = read_pooling_config(path)
        tokenizer = load_tokenizer(path)
        if host_model is None:
            weights_nbytes(path)  # validates presence and safetensors headers with a readable message
            try:
                model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=weights_dtype)
            except Exception as exc:
                raise ModelLoadError(f"cannot load embedding model from {path}: {exc}") from exc
        else:
            model = host_model
        model = model.to(dev).eval()
        return cls(model, tokenizer, pooling, device=dev, max_batch_size=max_batch_size, name=name)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the model's parameters and buffers on its device."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _special_wrapping(self) -> tuple[list[int], list[int]]:
        """Token ids the tokenizer puts before and after one input (e.g. [CLS] ... [SEP] for BERT)."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        return [], []

    def encode_inputs(self, inputs: list[str] | list[list[int]], max_total_tokens: int | None = None) -> list[list[int]]:
        """Token ids fed to the model for each input, special tokens included.

        Strings are tokenised; token-id lists are wrapped in the tokenizer's special tokens.

        Raises:
            ValueError: an empty input list, a token id outside the vocabulary, an input longer
                than :attr:`max_model_len` tokens, or more than ``max_total_tokens`` tokens in all
                (the API answers 400).
        """
        if not inputs:
            raise ValueError("input must not be empty")
        if isinstance(inputs[0], str):
            # A string cannot hold fewer tokens than characters / (longest vocabulary entry): refuse
            # one that cannot fit before tokenizing it.
            longest = self._max_token_chars()
            for i, text in enumerate(inputs):
                if len(text) > self.max_model_len * longest:
                    raise ValueError(f"input {i} has {len(text)} characters, more than the model {self.name!r} "
                                     f"accepts ({self.max_model_len} tokens)")
            with self._tokenizer_lock:
                ids = self.tokenizer(list(inputs), add_special_tokens=True)["input_ids"]
        else:
            vocab = len(self.tokenizer)
            ids = []
            for row in inputs:
                bad = [t for t in row if not 0 <= int(t) < vocab]
                if bad:
                    raise ValueError(outside_vocabulary(bad[0], vocab))
                ids.append(self._prefix + [int(t) for t in row] + self._suffix)
        for i, row in enumerate(ids):
            if len(row) > self.max_model_len:
                raise ValueError(
                    f"input {i} has {len(row)} tokens, more than the model {self.name!r} accepts ({self.max_model_len})"
                )
        total = sum(len(r) for r in ids)
        if max_total_tokens is not None and total > max_total_tokens:
            raise ValueError(f"the inputs have {total} tokens in all, more than the limit of {max_total_tokens} "
                             "per request; split them over several requests")
        return ids

    def _max_token_chars(self) -> int:
        cached = getattr(self, "_longest_token", None)
        if cached is None:
            cached = self._longest_token = max((len(k) for k in self.tokenizer.get_vocab()), default=1) + 1
        return cached

    async def embed(
        self, inputs: list[str] | list[list[int]], max_total_tokens: int | None = None, *,
        normalize: bool | None = None, dimensions: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """Embed ``inputs``, batched fairly with whatever other callers are waiting.

        Cancelling the call (the client left) drops its rows not yet run from the next forwards.

        Args:
            normalize: L2-normalise each vector (None: as the model's pipeline does, its
                ``Normalize`` module).
            dimensions: keep the first ``dimensions`` values of each vector before normalising
                (Matryoshka truncation; the caller checks the model supports it).

        Returns:
            (vectors, prompt_tokens): ``vectors`` is a (len(inputs), dim) float32 array in input
            order; ``prompt_tokens`` counts the tokens fed to the model (special tokens included).

        Raises:
            ValueError: see :meth:`encode_inputs`.
            RuntimeError: the embedder was shut down.
        """
        if self._closed:
            raise RuntimeError(f"embedding model {self.name!r} is shut down")
        ids = await asyncio.to_thread(self.encode_inputs, inputs, max_total_tokens)
        if self._closed:
            raise RuntimeError(f"embedding model {self.name!r} is shut down")
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._batch_loop(), name=f"embed-batcher-{self.name}")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        job = _Job(ids, loop.create_future(), np.empty((len(ids), self.dim), dtype=np.float32), order)
        self._pending.append(job)
        self._wake.set()
        vectors = await job.future
        if dimensions is not None:
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if self.pooling.normalize if normalize is None else normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors, sum(len(r) for r in ids)

    def _next_batch(self) -> list[tuple[_Job, int]]:
        """Up to ``max_batch_size`` (job, row) pairs taken round-robin over the live queued jobs."""
        live = [j for j in self._pending if not j.future.done()]
        self._pending = collections.deque(live)
        picked: list[tuple[_Job, int]] = []
        while len(picked) < self.max_batch_size:
            progressed = False
            for job in live:
                if job.next < len(job.order) and len(picked) < self.max_batch_size:
                    picked.append((job, job.order[job.next]))
                    job.next += 1
                    progressed = True
            if not progressed:
                break
        return picked

    async def _batch_loop(self) -> None:
        """Run one fair forward at a time (see the module docstring) until shut down."""
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while not self._closed:
            picked = self._next_batch()
            if not picked:
                self._wake.clear()
                await self._wake.wait()
                continue
            rows = [job.ids[i] for job, i in picked]
            try:
                out = await loop.run_in_executor(self._executor, self._forward_all, rows)
            except Exception as exc:
                for job in {id(j): j for j, _ in picked}.values():
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for (job, i), vec in zip(picked, out, strict=True):
                job.out[i] = vec
                job.done_rows += 1
                if job.done_rows == len(job.ids) and not job.future.done():
                    job.future.set_result(job.out)
            self._pending = collections.deque(j for j in self._pending if not j.future.done())

    @torch.inference_mode()
    def _forward_all(self, rows: list[list[int]]) -> np.ndarray:
        """Embed ``rows`` (token ids) in forwards of <= max_batch_size sequences; (len(rows), dim) float32,
        not normalised (:meth:`embed` normalises per request)."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for s in range(0, len(order), self.max_batch_size):
            idx = order[s:s + self.max_batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), width), self._pad_id, dtype=torch.int64)
            mask = torch.zeros((len(idx), width), dtype=torch.int64)
            for b, i in enumerate(idx):
                ids[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.int64)
                mask[b, : len(rows[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            kwargs = {"token_type_ids": torch.zeros_like(ids)} if self._uses_token_types else {}
            hidden = self.model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
            out[idx] = pool(hidden, mask, self._raw_pooling).cpu().numpy()
            self.num_forwards += 1
        return out

    async def offload(self) -> torch.nn.Module:
        """Move the model to host memory and return it for the warm tier (the embedder is unusable after)."""
        await self._stop()
        model = self.model
        if self.device.type != "cpu":
            model = await asyncio.get_running_loop().run_in_executor(None, lambda: model.to("cpu"))
        return model

    async def _stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError(f"embedding model {self.name!r} was unloaded"))
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    async def shutdown(self) -> None:
        """Stop the batcher, fail queued callers with RuntimeError, and drop the model's memory."""
        await self._stop()
        self.model = None
