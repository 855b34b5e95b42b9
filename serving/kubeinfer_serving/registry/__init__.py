"""kubeinfer_serving.registry: the multi-model manager of a serving pod (DESIGN.md section 5).

Interface used by the API and ``__main__``::

    from kubeinfer_serving.registry import ModelRegistry, catalogue_from_config

    catalogue = catalogue_from_config(args.models_config)   # --models-config FILE, else
                                                            # $KUBEINFER_MODELS_CONFIG, else the
                                                            # built-in tiny-llama + all-minilm-l6-v2
    registry = ModelRegistry(catalogue)                     # implements protocol.ModelProvider
    await registry.start()                                  # loads preloaded models (never raises)
    registry.is_ready()                                     # /ready: every preloaded model loaded
    registry.list_models() -> list[ModelInfo]               # GET /v1/models (state, bytes, message)
    async with registry.acquire("name") as served:          # held = busy = never evicted
        served.engine      # AsyncLLMEngine for kind generate (None for embed)
        served.embedder    # embeddings.Embedder for kind embed (None for generate):
                           #   vectors, prompt_tokens = await served.embedder.embed(list[str] | list[list[int]])
                           #   vectors: np.ndarray (n, dim) float32; ValueError on too-long/empty input
        served.tokenizer, served.max_model_len, served.kind, served.name
    await registry.load("name") / await registry.unload("name")   # admin API, return ModelInfo
    await registry.shutdown()

Errors (``protocol``): ModelNotFoundError (404) for unknown names; ModelUnavailableError (503)
for a Failed model (message has the reason), no memory within ``acquireTimeoutSeconds``
(message names the busy models), a load slower than ``loadTimeoutSeconds``, or an admin unload
of a busy/preloaded/loading model.

Modules: :mod:`.catalogue` (file format, pydantic), :mod:`.manager` (single-flight loads, LRU
eviction within a byte budget and count limit), :mod:`.loading` (sizing and loading engines and
embedders), :mod:`.warm` (host-memory tier of evicted weights), :mod:`.memory` (budget),
:mod:`.protocol` (the contract with the API).
"""

from kubeinfer_serving.registry.catalogue import (
    MODELS_CONFIG_ENV,
    Catalogue,
    CatalogueError,
    ModelEntry,
    catalogue_from_config,
    default_catalogue,
    load_catalogue,
)
from kubeinfer_serving.registry.loading import DefaultModelLoader, LoadedModel, LoadPlan, ModelLoader
from kubeinfer_serving.registry.manager import LoadEvent, ModelRegistry
from kubeinfer_serving.registry.warm import HostSnapshot, WarmTier

__all__ = [
    "MODELS_CONFIG_ENV", "Catalogue", "CatalogueError", "ModelEntry", "catalogue_from_config",
    "default_catalogue", "load_catalogue", "DefaultModelLoader", "LoadedModel", "LoadPlan", "ModelLoader",
    "LoadEvent", "ModelRegistry", "HostSnapshot", "WarmTier",
]
