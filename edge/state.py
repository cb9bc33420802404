"""The device's small state documents, in one place: one TinyDB file, replaced whole on every write.

What a device must remember across restarts besides its queue and its models' bytes fits in a
few small documents: the desired configuration it last accepted (what waits for a restart gets
one), and per model the active version, the versions that ran before it (rollback targets), the
installed ones and the ones that failed (never retried). They live together in one JSON file::

    {"desired": {"1": {"fleet": {...}, "device": {...}}},
     "models":  {"1": {"name": "digits", "active": "2", "history": ["1"], "installed": [...], "failed": {...}}}}

A write goes to a temporary file in the same directory, is fsynced, renamed over the old file,
and the directory is fsynced (:class:`CrashSafeStorage`): a crash at any moment leaves the old
document or the new one, never a torn file. A file that cannot be read all the same (damage from
outside) is set aside beside itself, with a warning naming it and the reason, and the device
starts from empty documents rather than not at all.

Where the file lives: ``<config>.state.json`` beside a device's configuration file (``edgewire
edge run``); else ``state.json`` at the root of the model store; else in memory. Documents kept
by earlier releases (``<config>.desired.json``, ``<store>/<model>/state.json``) are taken in once
and their files removed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tinydb import Query, TinyDB
from tinydb.queries import QueryLike
from tinydb.storages import MemoryStorage, Storage
from tinydb.table import Table

from edgewire import durable

log = logging.getLogger(__name__)

T = TypeVar("T")
_DESIRED, _MODELS = "desired", "models"


class CrashSafeStorage(Storage):
    """TinyDB storage that replaces its file whole on each write (temporary file, fsync, rename,
    fsync of the directory)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.strip():
            return None
        data = json.loads(raw)
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            raise ValueError("expected a map of tables")
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())

    def close(self) -> None:
        pass


class DeviceState:
    """The device's state documents. Safe to use from several threads (one lock)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is None:
            self._db = TinyDB(storage=MemoryStorage)
            return
        self._db = TinyDB(self.path, storage=CrashSafeStorage)
        try:
            self._db.tables()
        except (OSError, ValueError) as exc:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            log.warning("%s is unreadable (%s); set aside as %s, starting from empty state", self.path, exc, aside)
            try:
                self.path.replace(aside)
            except OSError as move:
                log.warning("%s could not be set aside (%s); it will be overwritten", self.path, move)
                self.path.unlink(missing_ok=True)

    @classmethod
    def beside(cls, config_path: Path) -> DeviceState:
        """The state of the device run from ``config_path``, kept next to it; takes in a desired
        document an earlier release kept as ``<config>.desired.json``."""
        state = cls(config_path.with_name(config_path.name + ".state.json"))
        state._take_in_desired(config_path.with_name(config_path.name + ".desired.json"))
        return state

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()

    # -- desired configuration ---------------------------------------------------------------

    def desired(self) -> dict[str, dict[str, Any]]:
        """{"fleet": ..., "device": ...}: the desired documents last accepted; empty when none.
        ValueError, naming the file, when the saved document is not of that shape."""
        docs = self._locked(self._db.table(_DESIRED).all)
        if not docs:
            return {"fleet": {}, "device": {}}
        raw = dict(docs[0])
        if not all(isinstance(raw.get(k, {}), dict) for k in ("fleet", "device")):
            raise ValueError(f"{self.where}: expected a map with 'fleet' and 'device' maps in its desired document")
        return {"fleet": raw.get("fleet", {}), "device": raw.get("device", {})}

    def save_desired(self, documents: dict[str, dict[str, Any]]) -> None:
        data = {"fleet": documents.get("fleet", {}), "device": documents.get("device", {})}

        self._locked(lambda: _replace(self._db.table(_DESIRED), None, data))

    # -- models ------------------------------------------------------------------------------

    def model(self, name: str) -> dict[str, Any] | None:
        """The record of model ``name`` (active, history, installed, failed), or None."""
        found = self._locked(lambda: self._db.table(_MODELS).get(Query().name == name))
        if found is None or isinstance(found, list):
            return None
        record = dict(found)
        record.pop("name", None)
        return record

    def save_model(self, name: str, record: dict[str, Any]) -> None:
        self._locked(lambda: _replace(self._db.table(_MODELS), Query().name == name, {**record, "name": name}))

    def forget_model(self, name: str) -> None:
        self._locked(lambda: self._db.table(_MODELS).remove(Query().name == name))

    # -- helpers -----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "<memory>"

    def _take_in_desired(self, legacy: Path) -> None:
        if not legacy.exists():
            return
        try:
            raw = json.loads(legacy.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s); not taken into %s", legacy, exc, self.where)
            return
        if not self._locked(self._db.table(_DESIRED).all):
            if isinstance(raw, dict):
                self._locked(lambda: self._db.table(_DESIRED).insert(raw))
            else:
                log.warning("%s: expected a map; not taken into %s", legacy, self.where)
                return
        legacy.unlink(missing_ok=True)
        log.info("desired documents of %s now kept in %s", legacy, self.where)


def _replace(table: Table, cond: QueryLike | None, data: dict[str, Any]) -> None:
    """Replace the document ``cond`` finds (the table's only one, without ``cond``) by ``data``,
    in one write of the file: a crash never leaves it removed and not yet put back."""
    found = table.get(cond) if cond is not None else next(iter(table.all()), None)
    if found is None or isinstance(found, list):
        table.insert(data)
        return

    def replace(doc: dict[str, Any]) -> None:
        doc.clear()
        doc.update(data)

    table.update(replace, doc_ids=[found.doc_id])
