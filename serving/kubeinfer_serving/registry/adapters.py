"""Reading a model's catalogue adapters into its engine when the model loads.

Each adapter is resolved like a model source (a local directory, or fetched into the disk tier
and pinned only while it is read), read and checked by
:func:`kubeinfer_serving.lora.peft_format.load_peft_adapter`, and added to the engine before its
loop starts. An adapter that fails is recorded with its reason and skipped: the base model and
the other adapters load and serve regardless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeinfer_serving.lora.adapter import LoRAAdapter, LoRAShapes
from kubeinfer_serving.lora.peft_format import load_peft_adapter
from kubeinfer_serving.registry.catalogue import AdapterEntry

log = logging.getLogger(__name__)


@dataclass
class AdapterStatus:
    """The outcome of reading one adapter.

    Attributes:
        name: the adapter's model id.
        error: why it cannot be served ("" when it loaded).
        bytes: host bytes of its weights (0 when it failed).
        revision: pinned revision of a remote source, else None.
    """

    name: str
    error: str = ""
    bytes: int = 0
    revision: str | None = None


#: ``local_dir(adapter) -> (directory, extras)``: the loader's source resolution (extras may hold
#: ``release``, a callable unpinning a disk-tier snapshot, and ``revision``).
LocalDir = Callable[[AdapterEntry], tuple[Path, dict[str, Any]]]


def read_adapter(adapter: AdapterEntry, hf_config: Any, max_rank: int, local_dir: LocalDir
                 ) -> tuple[LoRAAdapter | None, AdapterStatus]:
    """Resolve and read one adapter for a base model of config ``hf_config``. Never raises: a
    failure gives (None, a status whose ``error`` says why). Blocking (run it in a thread)."""
    extras: dict[str, Any] = {}
    try:
        path, extras = local_dir(adapter)
        lora = load_peft_adapter(path, adapter.name, LoRAShapes.from_hf_config(hf_config), max_rank,
                                 source=adapter.source)
    except Exception as exc:  # noqa: BLE001 - one bad adapter fails alone
        log.error("adapter %s failed to load: %s", adapter.name, exc)
        return None, AdapterStatus(adapter.name, error=str(exc) or type(exc).__name__)
    finally:
        extras.get("release", lambda: None)()
    return lora, AdapterStatus(adapter.name, bytes=lora.nbytes, revision=extras.get("revision"))


def load_adapter_into(llm: Any, adapter: AdapterEntry, local_dir: LocalDir) -> AdapterStatus:
    """Read one adapter and add it to ``llm`` (an :class:`~kubeinfer_serving.engine.llm_engine.LLMEngine`
    whose loop has not started). Never raises: a failure is the status' ``error``."""
    lora, status = read_adapter(adapter, llm.hf_config, llm.config.max_lora_rank, local_dir)
    if lora is not None:
        try:
            llm.add_lora(lora)
        except Exception as exc:  # noqa: BLE001 - e.g. LoRA off for this engine
            return AdapterStatus(adapter.name, error=str(exc))
    return status


class AdapterBoundEngine:
    """A generate model's engine as seen by requests for one of its adapters: ``generate`` runs
    with the adapter; everything else (stats, config, tokenizer) is the base engine's.

    Args:
        engine: the base model's :class:`~kubeinfer_serving.engine.async_engine.AsyncLLMEngine`.
        adapter: the adapter's name.
    """

    def __init__(self, engine: Any, adapter: str) -> None:
        self._engine = engine
        self.adapter = adapter

    def generate(self, request_id: str, prompt_token_ids: list[int], params: Any):
        """The base engine's ``generate`` with ``lora`` = this adapter (same outputs and errors)."""
        return self._engine.generate(request_id, prompt_token_ids, params, lora=self.adapter)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any, sink: Any) -> None:
        """The base engine's ``add_request`` with ``lora`` = this adapter (same sink and errors)."""
        self._engine.add_request(request_id, prompt_token_ids, params, sink, lora=self.adapter)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)
