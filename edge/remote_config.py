"""Over-the-air configuration: desired settings arrive retained, the device reports what it did.

The fleet-wide document (config/fleet/<fleet>) and the device's own (config/desired/<device>)
are merged, device over fleet, onto the configuration the device booted with. The result is
validated as a whole before anything changes: an invalid document is refused with its reason and
the running configuration stays exactly as it was. Judge thresholds, escalation settings and
publishing apply at once; anything else (broker, source, model, pipeline) is reported as
waiting for a restart.

A device keeps the last desired documents it accepted in its state (:mod:`.state`; beside its
configuration file when started from one, ``edgewire edge run``) and boots with them over the file
(:func:`boot_config`), so what waited for a restart takes effect at the restart. Documents that no
longer validate against the file are set aside with a warning and the device boots from the file alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pydantic import ValidationError

from edgewire import envelopes as env
from edgewire import topics
from edgewire.config import DeviceConfig, deep_merge
from edgewire.metrics import Meter
from edgewire.session import MqttSession

from .state import DeviceState

log = logging.getLogger(__name__)

LIVE_SECTIONS = frozenset({"judge", "detect", "cloud", "publish"})


class Outcome:
    def __init__(self, status: str, config: DeviceConfig, reason: str | None = None) -> None:
        self.status = status
        self.config = config
        self.reason = reason
        #: The desired document's revision, once it is known which one this answers.
        self.revision = 0


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


def boot_config(file_config: DeviceConfig, state: DeviceState) -> DeviceConfig:
    """The configuration to boot with: the file's, with the saved desired documents over it."""
    try:
        documents = state.desired()
    except ValueError as exc:
        log.warning("%s; booting from the config file alone", exc)
        return file_config
    if not documents["fleet"] and not documents["device"]:
        return file_config
    wanted = merged(file_config, documents["fleet"], documents["device"])
    if isinstance(wanted, str):
        log.warning(
            "the desired documents saved in %s no longer apply to the config file (%s); booting from the file alone",
            state.where,
            wanted,
        )
        return file_config
    return wanted


class RemoteConfig:
    """The desired documents a running device follows: kept, evaluated, saved, reported."""

    def __init__(self, boot: DeviceConfig, state: DeviceState, meter: Meter) -> None:
        self.boot = boot
        self.state = state
        self.meter = meter
        self.device_id = boot.device_id
        self.documents: dict[str, dict[str, Any]] = {"fleet": {}, "device": {}}
        self._topics = {
            topics.CONFIG_FLEET.build(fleet=boot.fleet): "fleet",
            topics.CONFIG_DESIRED.build(device_id=boot.device_id): "device",
        }

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(topic, topics.CONFIG_DESIRED.qos) for topic in self._topics]

    def wants(self, topic: str) -> bool:
        return topic in self._topics

    async def receive(self, topic: str, data: bytes | bytearray, current: DeviceConfig) -> Outcome | None:
        """What a desired document means for a device running ``current``; None for a cleared one."""
        which = self._topics[topic]
        if not data:  # a cleared retained document
            self.documents[which] = {}
            await self._save()
            return None
        desired = env.decode(env.DesiredConfig, data)
        self.documents[which] = desired.config
        outcome = evaluate(self.boot, current, self.documents["fleet"], self.documents["device"])
        outcome.revision = desired.revision
        if outcome.status != "rejected":
            await self._save()
        self.meter.inc("config_updates_total", status=outcome.status)
        log.info("%s: desired config r%d %s %s", self.device_id, desired.revision, outcome.status, outcome.reason or "")
        return outcome

    async def report(self, session: MqttSession, outcome: Outcome) -> None:
        """Say what was done with a desired document, with the configuration now running."""
        report = env.ReportedConfig(
            device_id=self.device_id,
            revision=outcome.revision,
            status=outcome.status,
            config=outcome.config.model_dump(mode="json", exclude={"broker": {"password"}}),
            reason=outcome.reason,
            ts=time.time(),
        )
        await session.publish(
            topics.CONFIG_REPORTED.build(device_id=self.device_id),
            env.encode(report),
            qos=topics.CONFIG_REPORTED.qos,
            retain=True,
            timeout=10,
        )

    async def _save(self) -> None:
        """Keep the documents in force for the next boot (what waits for a restart gets one);
        written and synced off the event loop, which keeps serving frames meanwhile."""
        try:
            await asyncio.to_thread(self.state.save_desired, dict(self.documents))
        except OSError as exc:
            log.warning("%s: desired config not saved for the next boot: %s", self.device_id, exc)
