"""Hop count of the serving pod's request path: one non-streaming chat completion, traced in-process.

Serves the app of ``tests/api`` (the multi-model registry over the built-in tiny Llama, on CPU)
with a real uvicorn server on a loopback port, in this process's event loop, and sends one
warm-up request then one measured ``POST /v1/chat/completions`` (``max_tokens`` 4, not streamed)
with ``httpx`` from the same loop.

What is counted (the measured request only, all threads but the engine's loop thread, through
``sys.setprofile`` and ``threading.setprofile``):

* ``hops``: the distinct functions of the ``kubeinfer_serving`` package (by module and
  qualified name; a closure is its own function, a function called twice counts once) entered
  from the first entry into the route's endpoint function until the response's
  ``http.response.start`` message leaves the app. Entries into the ASGI middleware classes
  (qualified names under a middleware class of the app's stack) and into their shared status
  recorder (:mod:`kubeinfer_serving.asgi_status`) are left out: they are counted as layers. The
  engine's loop thread (``engine-*``: scheduling, the forward pass, sampling) is left out, so
  what remains is the path from the route to the engine's asyncio face and back, tokenization
  on worker threads included.
* ``calls``: how many times those functions were entered (a coroutine resumed after an
  ``await`` counts again: the profiler sees a resumption as a call).

  Comprehensions, module bodies and the ``__init__`` that ``dataclasses`` generates are not
  counted as functions. The worker threads of ``asyncio.to_thread`` are replaced by fresh ones
  before the measured request, so that the profiler reaches them.
* ``modules``: the distinct modules those functions belong to.
* ``asgi_layers``: the ASGI middleware between uvicorn and the router: the objects reached from
  ``app.middleware_stack`` through ``.app`` until the router (Starlette's own
  ``ServerErrorMiddleware`` and ``ExceptionMiddleware`` included), by class name.

Prints one JSON object; ``--list`` adds the functions counted. Run from a checkout::

    PYTHONPATH=serving python bench/api_hops.py [--list]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import uvicorn
from kubeinfer_serving.api.app import create_app
from kubeinfer_serving.config import ServerSettings
from kubeinfer_serving.models.builtin import BUILTIN_MODEL_NAME
from kubeinfer_serving.registry.catalogue import Catalogue, ModelEntry
from kubeinfer_serving.registry.manager import ModelRegistry

ROUTE = "/v1/chat/completions"
#: Code objects that are not functions of the source: module bodies, comprehensions (inlined by
#: Python 3.12) and the ``__init__`` that ``dataclasses`` generates (``__create_fn__``).
_NOT_FUNCTIONS = {"<module>", "<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "__create_fn__"}
BODY = {"model": BUILTIN_MODEL_NAME, "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": 4, "temperature": 0}


def asgi_layers(app: Any) -> list[str]:
    """Class names of the ASGI layers from ``app.middleware_stack`` down to (not including) the router."""
    names = []
    layer = app.middleware_stack or app.build_middleware_stack()
    while layer is not None and layer is not app.router:
        names.append(type(layer).__name__)
        layer = getattr(layer, "app", None)
    return names


def find_route(routes: list[Any], path: str) -> Any:
    """The route serving ``path``, searched through included routers too.

    Raises:
        LookupError: no route has that path.
    """
    for route in routes:
        if getattr(route, "path", None) == path:
            return route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            try:
                return find_route(inner.routes, path)
            except LookupError:
                pass
    raise LookupError(path)


class HopRecorder:
    """Profiles calls into ``kubeinfer_serving`` while the measured request is in flight (see the module docstring).

    Args:
        endpoint_code: the code object of the route's endpoint function (starts the window).
        middleware: class names whose methods and closures count as ASGI layers, not hops.
    """

    def __init__(self, endpoint_code: Any, middleware: set[str]) -> None:
        self.endpoint_code = endpoint_code
        self.middleware = middleware
        self.armed = False
        self.open = False
        self.hops: dict[str, int] = {}

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        """``sys.setprofile`` hook: record each Python function entry inside the window."""
        if event != "call" or not self.armed:
            return
        code = frame.f_code
        if code is self.endpoint_code:
            self.open = True
        if not self.open:
            return
        module = frame.f_globals.get("__name__", "")
        if "__create_fn__" in getattr(code, "co_qualname", ""):
            return
        if not module.startswith("kubeinfer_serving") or module == "kubeinfer_serving.asgi_status":
            return
        if threading.current_thread().name.startswith("engine-"):
            return
        qualname = getattr(code, "co_qualname", code.co_name)
        if qualname.split(".", 1)[0] in self.middleware or code.co_name in _NOT_FUNCTIONS:
            return
        key = f"{module}:{qualname}"
        self.hops[key] = self.hops.get(key, 0) + 1

    def close_on_response(self, app: Any) -> Any:
        """Wrap ``app`` so the window closes when the response's ``http.response.start`` is sent."""

        async def probe(scope: Any, receive: Any, send: Any) -> None:
            async def watched_send(message: Any) -> None:
                if message["type"] == "http.response.start" and self.open:
                    self.armed = self.open = False
                await send(message)

            await app(scope, receive, watched_send)

        return probe


async def measure() -> dict[str, Any]:
    """Serve the test app, warm it up, trace one request; the counts as a dict (see the module docstring)."""
    catalogue = Catalogue(models=[ModelEntry(name=BUILTIN_MODEL_NAME, source=f"builtin://{BUILTIN_MODEL_NAME}",
                                             preload=True, max_model_len=1024)],
                          max_num_seqs=8, max_num_batched_tokens=512, memory_budget_bytes=4 * 1024**3)
    app = create_app(ModelRegistry(catalogue, device="cpu"), settings=ServerSettings(host="127.0.0.1", port=0))
    route = find_route(app.routes, ROUTE)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    layers: list[str] = []
    recorder: HopRecorder | None = None

    async def served(scope: Any, receive: Any, send: Any) -> None:
        await (recorder.close_on_response(app) if recorder else app)(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(served, log_level="warning", lifespan="on"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            for _ in range(600):
                try:
                    if (await client.get("/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            (await client.post(ROUTE, json=BODY)).raise_for_status()  # warm-up: lazy imports, first compiles
            layers = asgi_layers(app)
            recorder = HopRecorder(route.endpoint.__code__, set(layers))
            threading.setprofile(recorder.profile)
            sys.setprofile(recorder.profile)
            # fresh worker threads (tokenization runs there) so they start with the profiler on
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor())
            recorder.armed = True
            try:
                response = await client.post(ROUTE, json=BODY)
            finally:
                sys.setprofile(None)
                threading.setprofile(None)  # type: ignore[arg-type]
            response.raise_for_status()
    finally:
        server.should_exit = True
        await serving
        sock.close()
    modules = {key.split(":", 1)[0] for key in recorder.hops}
    return {"route": ROUTE, "hops": len(recorder.hops), "calls": sum(recorder.hops.values()), "modules": len(modules),
            "asgi_layers": len(layers), "layers": layers, "functions": dict(sorted(recorder.hops.items()))}


def main(argv: list[str] | None = None) -> None:
    """Print the counts as JSON (with ``--list``, every function counted and its entries)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--list", action="store_true", help="also print every function counted")
    args = parser.parse_args(argv)
    result = asyncio.run(measure())
    if not args.list:
        result.pop("functions")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
