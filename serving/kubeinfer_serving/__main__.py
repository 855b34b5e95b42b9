"""``kubeinfer-serve``: run the serving pod's HTTP server (uvicorn) over a model provider.

Which models it serves:

* ``--model-dir DIR [--served-model-name NAME]``: that one directory (single-model mode);
* ``--models-config FILE`` or ``$KUBEINFER_MODELS_CONFIG``: the catalogue in FILE (the
  operator's ConfigMap), served by the multi-model registry (load on demand, LRU eviction);
* neither: the default catalogue, ``tiny-llama`` (the built-in model, built once into the cache
  if missing) and ``all-minilm-l6-v2`` (embeddings), both preloaded.

On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish for up to
``--timeout-graceful-shutdown`` seconds, ends what still runs cleanly (a 503 body or an SSE
error event and ``[DONE]``), then the app's lifespan shuts the provider down; the exit status
is 0 after such a clean drain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import uvicorn

from kubeinfer_serving.api.limits import guarded_h11_protocol
from kubeinfer_serving.config import ServerSettings, build_parser, parse_settings
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.registry.protocol import ModelProvider

log = logging.getLogger("kubeinfer_serving")


def engine_config(settings: ServerSettings) -> EngineConfig:
    """Engine settings for single-model mode: the flags given, the engine's defaults otherwise."""
    given = {
        k: getattr(settings, k)
        for k in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests", "max_model_len", "device", "dtype",
                  "scheduling_policy")
        if getattr(settings, k) is not None
    }
    return EngineConfig(**given)


#: Flags that only single-model mode honours; with a catalogue they live in the catalogue file.
_SINGLE_MODEL_ONLY = {
    "max_model_len": "set maxModelLen per model in the catalogue",
    "dtype": "set dtype per model in the catalogue",
    "served_model_name": "it names the --model-dir model",
}


def build_provider(settings: ServerSettings) -> ModelProvider:
    """The model provider the settings ask for (see the module docstring).

    Raises:
        ValueError: a single-model-only flag was given together with a catalogue, or a
            catalogue-only flag (``--models-config``, ``--memory-budget-bytes``) with ``--model-dir``.
        kubeinfer_serving.registry.catalogue.CatalogueError: the catalogue file is unreadable or invalid.
    """
    if settings.model_dir is not None:
        for k in ("models_config", "memory_budget_bytes", "idle_timeout_seconds"):
            if getattr(settings, k) is not None:
                raise ValueError(f"--{k.replace('_', '-')} belongs to catalogue mode; it cannot go with --model-dir")
        from kubeinfer_serving.api.single_model import SingleModelProvider

        name = settings.served_model_name or settings.model_dir.resolve().name
        return SingleModelProvider(settings.model_dir, name, engine_config(settings))
    from kubeinfer_serving.registry.catalogue import default_catalogue, load_catalogue
    from kubeinfer_serving.registry.manager import ModelRegistry

    misplaced = [k for k in _SINGLE_MODEL_ONLY if getattr(settings, k) is not None]
    if misplaced:
        raise ValueError("; ".join(
            f"--{k.replace('_', '-')} needs --model-dir ({_SINGLE_MODEL_ONLY[k]})" for k in misplaced
        ))
    catalogue = load_catalogue(settings.models_config) if settings.models_config else default_catalogue()
    overrides = {k: getattr(settings, k) for k in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests",
                                                   "scheduling_policy", "idle_timeout_seconds")
                 if getattr(settings, k) is not None}
    if overrides:
        catalogue = catalogue.model_copy(update=overrides)
    return ModelRegistry(catalogue, budget_bytes=settings.memory_budget_bytes, device=settings.device)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, build the provider and app, and serve until SIGINT/SIGTERM."""
    settings = parse_settings(argv)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from kubeinfer_serving.api.app import create_app
    from kubeinfer_serving.server import DrainingServer, drain_config_timeout

    try:
        provider = build_provider(settings)
        app = create_app(provider, settings=settings)
    except ValueError as exc:  # CatalogueError and KeysFileError are ValueErrors too
        build_parser().error(str(exc))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=guarded_h11_protocol(settings.timeout_request_headers),
        timeout_keep_alive=settings.timeout_keep_alive,
        limit_concurrency=settings.limit_concurrency,
        timeout_graceful_shutdown=drain_config_timeout(settings.timeout_graceful_shutdown),
        access_log=settings.log_level in ("debug", "trace"),
    )
    DrainingServer(config, drain=app.state.drain, drain_seconds=settings.timeout_graceful_shutdown).run()


if __name__ == "__main__":
    main()
