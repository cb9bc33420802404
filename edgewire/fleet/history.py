"""The operator's push history: every manifest pushed, so a rollback can re-announce it as it was."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from edgewire import envelopes as env
from edgewire.delivery import MODEL_ID, DeliveryError, check_model_ids
from edgewire.durable import atomic_write
from edgewire.errors import DecodeError


def default_history_root() -> Path:
    """Where pushed manifests are remembered: $EDGEWIRE_HOME/models, else the XDG data folder."""
    home = os.environ.get("EDGEWIRE_HOME")
    if home:
        return Path(home).expanduser() / "models"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edgewire" / "models"


class History:
    """The manifests this operator pushed, so a rollback can re-announce an earlier version
    exactly as it was (same hash, same signature) without the artefact at hand.

    Layout: ``root/<name>/<version>.msgpack`` (the manifest's wire encoding) and, for a version
    that failed its canary or was rolled back, ``root/<name>/<version>.failed`` with the reason;
    ``latest`` and ``previous`` skip failed versions, ``get`` does not.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_history_root()

    def _path(self, name: str, version: str, suffix: str = ".msgpack") -> Path:
        check_model_ids(name, version)
        return self.root / name / f"{version}{suffix}"

    def save(self, manifest: env.Manifest) -> Path:
        path = self._path(manifest.name, manifest.version)
        atomic_write(path, env.encode(manifest))
        with contextlib.suppress(FileNotFoundError):
            self._path(manifest.name, manifest.version, ".failed").unlink()
        return path

    def get(self, name: str, version: str) -> env.Manifest:
        path = self._path(name, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            known = ", ".join(m.version for m in self.versions(name, include_failed=True)) or "none"
            raise DeliveryError(
                f"no version {version} of {name} in the push history {self.root} (known: {known})"
            ) from None
        except OSError as exc:
            raise DeliveryError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            return env.decode(env.Manifest, data)
        except DecodeError as exc:
            raise DeliveryError(f"{path}: not a stored manifest: {exc}") from None

    def versions(self, name: str, *, include_failed: bool = False) -> list[env.Manifest]:
        """Stored manifests of ``name``, oldest push first."""
        folder = self.root / name
        if not MODEL_ID.match(name) or not folder.is_dir():
            return []
        found = []
        for path in folder.glob("*.msgpack"):
            if not include_failed and path.with_suffix(".failed").exists():
                continue
            with contextlib.suppress(DeliveryError):
                found.append(self.get(name, path.stem))
        return sorted(found, key=lambda m: (m.created, m.version))

    def latest(self, name: str) -> env.Manifest | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def previous(self, name: str, current: str) -> env.Manifest | None:
        """The newest good version pushed before ``current`` (or, when ``current`` is not in the
        history, the newest good version other than it)."""
        every = self.versions(name, include_failed=True)
        mine = next((m for m in every if m.version == current), None)
        candidates = [
            m for m in self.versions(name) if m.version != current and (mine is None or m.created < mine.created)
        ]
        return candidates[-1] if candidates else None

    def mark_failed(self, name: str, version: str, reason: str) -> None:
        atomic_write(self._path(name, version, ".failed"), reason.encode())

    def failed(self, name: str, version: str) -> str | None:
        try:
            return self._path(name, version, ".failed").read_text()
        except FileNotFoundError:
            return None
