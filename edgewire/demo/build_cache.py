"""Build a demo model once and reuse it while nothing that shapes it has changed.

Training the detect demo's models takes tens of seconds; the demo, the bench and ``edgewire
models demo`` all want them. A model file is reused when the key written beside it matches: a
hash of the source files that build it and the versions of the libraries that train and export
it. Anything else (a code change, a library upgrade, a missing or unreadable key) rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgewire.durable import atomic_write

__all__ = ["Built", "cached_build"]

LIBRARIES = ("scikit-learn", "skl2onnx", "onnx", "numpy", "opencv-python-headless")


@dataclass(frozen=True)
class Built:
    """Where a model is, whether it was reused, and how long building it took (0 when reused)."""

    path: Path
    cached: bool
    train_seconds: float


def _key(sources: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    for dist in LIBRARIES:
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{dist}=?".encode())
    return digest.hexdigest()


def cached_build(path: Path, sources: Iterable[Path], build: Callable[[], bytes], *, force: bool = False) -> Built:
    """``path`` as ``build()`` makes it, unless a build from the same ``sources`` and libraries
    is there already (its key sits beside it as ``<stem>.key.json``)."""
    path = Path(path)
    key_file = path.with_name(f"{path.stem}.key.json")
    key = _key(sources)
    if not force and path.is_file() and key_file.is_file():
        try:
            if json.loads(key_file.read_text()).get("key") == key:
                return Built(path, cached=True, train_seconds=0.0)
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    data = build()
    seconds = time.perf_counter() - t0
    atomic_write(path, data)
    atomic_write(key_file, (json.dumps({"key": key, "train_seconds": round(seconds, 2)}) + "\n").encode())
    return Built(path, cached=False, train_seconds=seconds)
