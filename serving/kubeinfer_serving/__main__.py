"""``kubeinfer-serve``: run the serving pod's HTTP server (uvicorn) over a model provider.

Which models it serves:

* ``--model-dir DIR [--served-model-name NAME]``: that one directory (single-model mode);
* ``--models-config FILE``: the catalogue in FILE (the operator's ConfigMap);
* neither: the built-in model ``tiny-llama`` (built once into the cache if missing).

On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish for up to
``--timeout-graceful-shutdown`` seconds, then the app's lifespan shuts the provider down.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import uvicorn

from kubeinfer_serving.config import ServerSettings, parse_settings
from kubeinfer_serving.engine.config import EngineConfig
from kubeinfer_serving.registry.protocol import ModelProvider

log = logging.getLogger("kubeinfer_serving")


def engine_config(settings: ServerSettings) -> EngineConfig:
    """The engine settings that the server flags carry (batching caps, queue cap, context, device, dtype)."""
    return EngineConfig(
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_waiting_requests=settings.max_waiting_requests,
        max_model_len=settings.max_model_len,
        device=settings.device,
        dtype=settings.dtype,
    )


def build_provider(settings: ServerSettings) -> ModelProvider:
    """The model provider the settings ask for (see the module docstring).

    Raises:
        OSError: the built-in model cannot be written to its cache directory.
    """
    from kubeinfer_serving.api.single_model import SingleModelProvider

    if settings.model_dir is not None:
        name = settings.served_model_name or settings.model_dir.resolve().name
        return SingleModelProvider(settings.model_dir, name, engine_config(settings))
    from kubeinfer_serving.models.builtin import BUILTIN_MODEL_NAME, ensure_builtin_model

    return SingleModelProvider(ensure_builtin_model(), BUILTIN_MODEL_NAME, engine_config(settings))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and environment, build the provider and app, and serve until SIGINT/SIGTERM."""
    settings = parse_settings(argv)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from kubeinfer_serving.api.app import create_app

    app = create_app(build_provider(settings), settings=settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
        access_log=settings.log_level in ("debug", "trace"),
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
