"""Over-the-air configuration: desired settings arrive retained, the device reports what it did.

The fleet-wide document (config/fleet/<fleet>) and the device's own (config/desired/<device>)
are merged, device over fleet, onto the configuration the device booted with. The result is
validated as a whole before anything changes: an invalid document is refused with its reason and
the running configuration stays exactly as it was. Judge thresholds, escalation settings and
publishing apply at once; anything else (broker, source, model, pipeline) is reported as
waiting for a restart.

A device started from a file (``edgewire edge run``) keeps the last desired documents it accepted
beside that file (:class:`SavedDesired`) and boots with them over the file, so what waited for a
restart takes effect at the restart. Documents that no longer validate against the file are set
aside with a warning and the device boots from the file alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgewire.config import DeviceConfig, deep_merge
from edgewire.delivery import atomic_write

log = logging.getLogger(__name__)

LIVE_SECTIONS = frozenset({"judge", "cloud", "publish"})


class Outcome:
    def __init__(self, status: str, config: DeviceConfig, reason: str | None = None) -> None:
        self.status = status
        self.config = config
        self.reason = reason


def merged(boot: DeviceConfig, fleet: dict[str, Any], device: dict[str, Any]) -> DeviceConfig | str:
    """``boot`` with the fleet's document over it and the device's over both; why not, if invalid."""
    desired = deep_merge(deep_merge(boot.model_dump(mode="json"), fleet), device)
    try:
        wanted = DeviceConfig.model_validate(desired)
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
    if wanted.device_id != boot.device_id:
        return "device_id cannot be changed over the air"
    return wanted


def evaluate(boot: DeviceConfig, current: DeviceConfig, fleet: dict[str, Any], device: dict[str, Any]) -> Outcome:
    """What the desired documents mean for a device running ``current`` (booted as ``boot``)."""
    wanted = merged(boot, fleet, device)
    if isinstance(wanted, str):
        return Outcome("rejected", current, wanted)
    now = current.model_dump(mode="json")
    then = wanted.model_dump(mode="json")
    changed = {k for k in then if then[k] != now.get(k)}
    live = {k: getattr(wanted, k) for k in changed & LIVE_SECTIONS}
    applied = current.model_copy(update=live)
    rest = sorted(changed - LIVE_SECTIONS)
    if rest:
        return Outcome("pending_restart", applied, f"applied {sorted(live) or 'nothing'} now; {rest} on restart")
    return Outcome("applied", applied)


class SavedDesired:
    """The last desired documents a device accepted, kept in one JSON file beside its config."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def beside(cls, config_path: Path) -> SavedDesired:
        return cls(config_path.with_name(config_path.name + ".desired.json"))

    def load(self) -> dict[str, dict[str, Any]]:
        """{"fleet": ..., "device": ...}; empty documents when nothing was saved."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"fleet": {}, "device": {}}
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path}: unreadable ({exc}); delete it to boot from the config file alone") from None
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k, {}), dict) for k in ("fleet", "device")):
            raise ValueError(
                f"{self.path}: expected a map with 'fleet' and 'device' maps; "
                "delete it to boot from the config file alone"
            )
        return {"fleet": raw.get("fleet", {}), "device": raw.get("device", {})}

    def save(self, documents: dict[str, dict[str, Any]]) -> None:
        data = {"fleet": documents.get("fleet", {}), "device": documents.get("device", {})}
        atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True).encode())

    def boot_config(self, file_config: DeviceConfig) -> DeviceConfig:
        """The configuration to boot with: the file's, with the saved documents over it."""
        try:
            documents = self.load()
        except ValueError as exc:
            log.warning("%s; booting from the config file alone", exc)
            return file_config
        if not documents["fleet"] and not documents["device"]:
            return file_config
        wanted = merged(file_config, documents["fleet"], documents["device"])
        if isinstance(wanted, str):
            log.warning("%s no longer applies to the config file (%s); booting from the file alone", self.path, wanted)
            return file_config
        return wanted
