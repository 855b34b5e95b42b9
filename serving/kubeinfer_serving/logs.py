"""Logging set-up of the serving pod: plain text or one JSON object per line (``--log-format``).

The JSON form has ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and every field a
record carries in its ``fields`` extra (the request log's ``request_id``, ``status``, ...), so a
log pipeline can index them without parsing the message. uvicorn's loggers propagate to the
same handler, so its lines have the same form.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from kubeinfer_serving.config import LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring); exceptions go in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    """Send every logger's records (uvicorn's too) to stderr in ``fmt`` at ``level`` and above.

    Args:
        level: a ``logging`` level name (``trace`` counts as debug).
        fmt: ``text`` (``time LEVEL logger: message``) or ``json``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.DEBUG))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
