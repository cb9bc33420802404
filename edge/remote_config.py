"""Over-the-air configuration: desired settings arrive retained, the device reports what it did.

The fleet-wide document (config/fleet/<fleet>) and the device's own (config/desired/<device>)
are merged, device over fleet, onto the configuration the device booted with. The result is
validated as a whole before anything changes: an invalid document is refused with its reason and
the running configuration stays exactly as it was. Judge thresholds, escalation settings and
publishing apply at once; anything else (broker, source, model, pipeline) is reported as
waiting for a restart.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from edgewire.config import DeviceConfig, deep_merge

LIVE_SECTIONS = frozenset({"judge", "cloud", "publish"})


class Outcome:
    def __init__(self, status: str, config: DeviceConfig, reason: str | None = None) -> None:
        self.status = status
        self.config = config
        self.reason = reason


def evaluate(boot: DeviceConfig, current: DeviceConfig, fleet: dict[str, Any], device: dict[str, Any]) -> Outcome:
    """What the desired documents mean for a device running ``current`` (booted as ``boot``)."""
    desired = deep_merge(deep_merge(boot.model_dump(mode="json"), fleet), device)
    try:
        wanted = DeviceConfig.model_validate(desired)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        return Outcome("rejected", current, problems)
    if wanted.device_id != boot.device_id:
        return Outcome("rejected", current, "device_id cannot be changed over the air")
    now = current.model_dump(mode="json")
    then = wanted.model_dump(mode="json")
    changed = {k for k in then if then[k] != now.get(k)}
    live = {k: getattr(wanted, k) for k in changed & LIVE_SECTIONS}
    applied = current.model_copy(update=live)
    rest = sorted(changed - LIVE_SECTIONS)
    if rest:
        return Outcome("pending_restart", applied, f"applied {sorted(live) or 'nothing'} now; {rest} on restart")
    return Outcome("applied", applied)
