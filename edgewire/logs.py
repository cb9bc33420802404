"""Logs that can be joined: plain text by default, one JSON object a line when asked.

A JSON line carries ``device_id``, ``trace_id`` and ``model`` wherever one is at hand: from the
log call's ``extra``, else from the context bound with :func:`bind` (a context variable, so an
asyncio task and the tasks it starts carry the fields of the component that runs them, and
components sharing one process do not mix theirs up).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Any

#: The fields that join a line to a device, an escalation and a model.
FIELDS = ("device_id", "bridge_id", "trace_id", "model")
_CONTEXT: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("edgewire_log_context", default={})  # noqa: B039
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind(**fields: str | None) -> None:
    """Add fields to every log line of this context (this task and the tasks it starts)."""
    merged = {**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}}
    _CONTEXT.set(merged)


def bound() -> dict[str, str]:
    return dict(_CONTEXT.get())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_CONTEXT.get())
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str = "warning", fmt: str = "text") -> None:
    """The process's logging: ``fmt`` is ``text`` or ``json``; lines go to stderr."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r}: use text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
