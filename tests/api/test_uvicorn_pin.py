"""The header deadline (api/limits.py) subclasses uvicorn's private h11 protocol: the installed uvicorn
must be the one it was tested with, and the private surface it uses must still be there.

An upgrade of uvicorn fails here first; re-check :class:`GuardedH11Protocol` against the new
``uvicorn/protocols/http/h11_impl.py``, run test_hardening.py's D13 test, then move the pin in
pyproject.toml and requirements.lock together.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import uvicorn
from kubeinfer_serving.api.limits import GuardedH11Protocol, guarded_h11_protocol
from uvicorn.protocols.http.h11_impl import H11Protocol

ROOT = Path(__file__).resolve().parents[2]


def test_installed_uvicorn_is_the_pinned_one() -> None:
    locked = re.search(r"^uvicorn==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert locked and uvicorn.__version__ == locked.group(1)
    spec = re.search(r'"uvicorn>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert spec, "pyproject.toml must pin uvicorn to a minor version"
    low, high = (tuple(int(x) for x in v.split(".")) for v in spec.groups())
    assert low <= tuple(int(x) for x in uvicorn.__version__.split(".")[:2]) < high


def test_the_private_surface_the_subclass_uses_is_there() -> None:
    for method in ("data_received", "connection_lost", "connection_made"):
        assert callable(getattr(H11Protocol, method))
    source = inspect.getsource(H11Protocol)
    for attribute in ("self.conn =", "self.loop =", "self.transport =", "self.logger ="):
        assert attribute in source, attribute
    assert "their_state" in inspect.getsource(GuardedH11Protocol)
    assert issubclass(guarded_h11_protocol(2.5), H11Protocol) and guarded_h11_protocol(2.5).header_timeout == 2.5
