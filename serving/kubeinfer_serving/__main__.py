"""``kubeinfer-serve``: run the serving pod's HTTP server (uvicorn) over a model provider.

Which models it serves:

* ``--model SOURCE [--served-model-name NAME]`` (or the older ``--model-dir DIR``): that one model
  (single-model mode; any catalogue source, a directory or a ``.gguf`` file), as a one-entry
  catalogue (the model preloaded) served by the same registry. When it cannot load, the server
  exits with status 1 and the reason on stderr (a pod that would never be ready restarts and
  shows why);
* ``--models-config FILE`` or ``$KUBEINFER_MODELS_CONFIG``: the catalogue in FILE (the
  operator's ConfigMap), served by the multi-model registry (load on demand, LRU eviction);
* neither: the default catalogue (:func:`~kubeinfer_serving.registry.catalogue.default_catalogue`).

On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish for up to
``--timeout-graceful-shutdown`` seconds, ends what still runs cleanly (a 503 body or an SSE
error event and ``[DONE]``), then the app's lifespan shuts the provider down; the exit status
is 0 after such a clean drain.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from kubeinfer_serving import metrics
from kubeinfer_serving.api.limits import guarded_h11_protocol
from kubeinfer_serving.cli import build_parser, parse_settings
from kubeinfer_serving.config import ServerSettings, flag_names, pod_keys, single_model_fields
from kubeinfer_serving.logs import configure_logging
from kubeinfer_serving.registry.protocol import ModelProvider

log = logging.getLogger("kubeinfer_serving")


def single_model_source(settings: ServerSettings) -> str | None:
    """The source of single-model mode (``--model``, else ``--model-dir``), or None (catalogue mode).

    Raises:
        ValueError: both ``--model`` and ``--model-dir`` are given.
    """
    if settings.model is not None and settings.model_dir is not None:
        raise ValueError("--model and --model-dir name the same thing; give one of them")
    if settings.model is not None:
        return settings.model
    return str(settings.model_dir) if settings.model_dir is not None else None


def build_provider(settings: ServerSettings) -> ModelProvider:
    """The model provider the settings ask for (see the module docstring): always the registry.

    ``--model`` (``--model-dir``) becomes a one-entry catalogue
    (:func:`~kubeinfer_serving.registry.catalogue.single_model_catalogue`): the model preloaded,
    never evicted, its KV pool sized from the memory budget as in catalogue mode.

    Raises:
        ValueError: a single-model-only flag was given together with a catalogue, or a
            catalogue-only flag (``--models-config``, ``--idle-timeout-seconds``) with ``--model``, or
            both ``--model`` and ``--model-dir``.
        kubeinfer_serving.registry.catalogue.CatalogueError: the catalogue file is unreadable or
            invalid, or a single-model flag has a bad value.
    """
    from kubeinfer_serving.registry.catalogue import (
        default_catalogue,
        default_served_name,
        load_catalogue,
        single_model_catalogue,
    )
    from kubeinfer_serving.registry.manager import ModelRegistry

    overrides = {k: getattr(settings, k) for k in pod_keys() if settings.given(k)}
    if "memory_budget_bytes" in overrides and "gpu_memory_utilization" in overrides:
        raise ValueError("--memory-budget-bytes and --gpu-memory-utilization both set the budget; give one of them")
    if "gpu_memory_utilization" in overrides:  # the flag's fraction replaces a catalogue's absolute budget
        overrides["memory_budget_bytes"] = None
    source = single_model_source(settings)
    if source is not None:
        for k in ("models_config", "idle_timeout_seconds"):
            if settings.given(k):
                raise ValueError(f"{flag_names(k)[0]} belongs to catalogue mode; it cannot go with --model")
        name = settings.served_model_name or default_served_name(source)
        catalogue = single_model_catalogue(source, name, dtype=settings.dtype, max_model_len=settings.max_model_len,
                                           result_cache=bool(settings.result_cache),
                                           quantization=settings.quantization,
                                           tensor_parallel_size=settings.tensor_parallel_size,
                                           adapters=settings.lora_adapters(),
                                           chat_template=settings.chat_template, **overrides)
        return ModelRegistry(catalogue, budget_bytes=settings.memory_budget_bytes, device=settings.device,
                             show_sources=False)
    misplaced = [k for k in single_model_fields() if settings.given(k)]
    if misplaced:
        raise ValueError("; ".join(
            f"{flag_names(k)[0]} needs --model (with a catalogue, set {single_model_fields()[k]!r} per model)"
            for k in misplaced
        ))
    catalogue = load_catalogue(settings.models_config) if settings.models_config else default_catalogue()
    if overrides:
        catalogue = catalogue.model_copy(update=overrides)
    return ModelRegistry(catalogue, budget_bytes=settings.memory_budget_bytes, device=settings.device)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, build the provider and app, and serve until SIGINT/SIGTERM."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    metrics.configure_names(settings.metrics_names)
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
        log_config=None,  # uvicorn's loggers propagate to configure_logging's handler (text or JSON)
        http=guarded_h11_protocol(settings.timeout_request_headers),
        timeout_keep_alive=settings.timeout_keep_alive,
        limit_concurrency=settings.limit_concurrency,
        timeout_graceful_shutdown=drain_config_timeout(settings.timeout_graceful_shutdown),
        access_log=settings.log_level in ("debug", "trace"),
    )
    server = DrainingServer(config, drain=app.state.drain, drain_seconds=settings.timeout_graceful_shutdown)
    failed: list[str] = []
    if single_model_source(settings) is not None and hasattr(provider, "on_preload_failed"):
        def stop(name: str, reason: str) -> None:
            failed.append(f"kubeinfer-serve: model {name!r} cannot load: {reason}")
            server.should_exit = True

        provider.on_preload_failed = stop
    server.run()
    if failed:
        sys.exit("\n".join(failed))


if __name__ == "__main__":
    main()
