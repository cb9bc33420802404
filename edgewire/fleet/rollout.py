"""Putting a model version onto the fleet, and taking it back: the operator's side of delivery.

A push goes to every selected device at once unless a canary is asked for. With a canary, a few
devices get the version first; the rest follow only after each canary has run it for a
probation period without failing or rolling itself back. If a canary fails, the announce is put
back to the previous version, so no other device ever installs the bad one and the canaries
return to what they ran before.

Everything here talks MQTT through one operator session and the topics of topics.md; the CLI
only parses options and prints.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgewire import delivery, topics
from edgewire import envelopes as env
from edgewire.delivery import DeliveryError
from edgewire.errors import DecodeError
from edgewire.fleet.history import History
from edgewire.fleet.push import ProgressFn, announce, push, withdraw
from edgewire.fleet.status import collect_presence, collect_status, current_manifest, next_message
from edgewire.session import MqttSession

Say = Callable[[str], None]
FAILED_STATES = ("failed", "rolled_back")


class NoDistributor(DeliveryError):
    """No distributor is online: devices that miss a chunk, or connect later, could not get it."""


@dataclass
class RolloutResult:
    manifest: env.Manifest
    outcome: Literal["pushed", "promoted", "aborted"]
    canaries: list[str] = field(default_factory=list)
    reason: str | None = None
    # What the announce was put back to when a canary failed (None: the announce was cleared).
    restored: env.Manifest | None = None
    statuses: dict[tuple[str, str], env.ModelStatus] = field(default_factory=dict)


def online(presences: dict[str, env.Presence], kind: str) -> list[env.Presence]:
    return [p for p in presences.values() if p.kind == kind and p.online]


def matching_devices(presences: dict[str, env.Presence], targets: env.Targets) -> list[str]:
    """Online devices the selector picks, sorted (so a canary choice is repeatable)."""
    return sorted(
        p.client_id
        for p in online(presences, "device")
        if delivery.targets_match(targets, p.client_id, p.profile, p.fleet)
    )


def check_percent(percent: float) -> None:
    if not 0 < percent <= 100:
        raise DeliveryError(f"canary percentage {percent:g} is out of range: more than 0, at most 100")


def pick_canaries(devices: list[str], percent: float) -> list[str]:
    """The first ceil(percent %) of the sorted ids, at least one: deterministic, so a rerun picks
    the same devices and an operator can say in advance which ones will take the risk."""
    check_percent(percent)
    ordered = sorted(devices)
    return ordered[: max(1, math.ceil(len(ordered) * percent / 100))] if ordered else []


async def require_distributor(session: MqttSession, *, quiet_s: float = 0.5, timeout_s: float = 3.0) -> list[str]:
    """Ids of the online distributors; NoDistributor when there is none."""
    presences = await collect_presence(session, quiet_s=quiet_s, timeout_s=timeout_s)
    return _distributors(session, presences)


def _distributors(session: MqttSession, presences: dict[str, env.Presence]) -> list[str]:
    found = sorted(p.client_id for p in online(presences, "distributor"))
    if not found:
        raise NoDistributor(
            f"no distributor is online on mqtt://{session.host}:{session.port}: devices that miss a chunk or "
            "connect later could not fetch it. Start one (`edgewire distributor --broker URL --store DIR`, or "
            "`edgewire cloud`), or pass --no-distributor to push anyway"
        )
    return found


def check_history(history: History, manifest: env.Manifest) -> None:
    """Refuse to reuse a version number for another artefact: devices that stored the first one
    would keep it, others would get the second, and nobody could tell them apart by version."""
    try:
        earlier = history.get(manifest.name, manifest.version)
    except DeliveryError:
        return
    if earlier.sha256 != manifest.sha256:
        raise DeliveryError(
            f"{manifest.name} {manifest.version} was pushed before with another artefact "
            f"(sha256 {earlier.sha256[:12]}…, now {manifest.sha256[:12]}…); give it a new version"
        )


async def push_model(
    session: MqttSession,
    path: str | Path,
    manifest: env.Manifest,
    *,
    history: History,
    canary_percent: float | None = None,
    probation_s: float = 10.0,
    timeout_s: float = 300.0,
    require_distributor_online: bool = True,
    window: int = 16,
    progress: ProgressFn | None = None,
    say: Say = lambda _: None,
    quiet_s: float = 0.5,
) -> RolloutResult:
    """Push ``manifest`` (for the artefact at ``path``), straight or behind a canary.

    Raises NoDistributor or DeliveryError before anything is published; a failed canary is not an
    exception but a result with outcome ``aborted`` (the caller decides the exit status).
    """
    check_history(history, manifest)
    if canary_percent is not None:
        check_percent(canary_percent)
    presences: dict[str, env.Presence] = {}
    if require_distributor_online or canary_percent is not None:
        presences = await collect_presence(session, quiet_s=quiet_s)
    if require_distributor_online:
        say(f"distributor online: {', '.join(_distributors(session, presences))}")
    if canary_percent is None:
        history.save(manifest)
        await push(session, path, manifest, progress=progress, window=window)
        return RolloutResult(manifest, "pushed")

    devices = matching_devices(presences, manifest.targets)
    if not devices:
        raise DeliveryError(
            f"no online device matches {delivery.describe_targets(manifest.targets)}: nothing to try the canary on"
        )
    canaries = pick_canaries(devices, canary_percent)
    say(f"canary: {', '.join(canaries)} ({len(canaries)} of {len(devices)} matching device(s))")
    # What to put back if a canary fails: the announce as it is now, else the history's previous.
    before = await current_manifest(session, manifest.name, quiet_s=quiet_s)
    if before is not None and before.version == manifest.version:
        before = None
    history.save(manifest)
    # Watch before announcing, so no status the canaries publish is missed; what is retained
    # already is the baseline, and is not taken for an answer to this push.
    baseline = await collect_status(session, manifest.name, quiet_s=quiet_s)
    trial = manifest.model_copy(update={"targets": manifest.targets.model_copy(update={"devices": canaries})})
    await push(session, path, trial, progress=progress, window=window)
    say(f"waiting for {len(canaries)} canary(ies) to run {manifest.version} for {probation_s:g} s")
    reason = await watch_canaries(
        session, manifest, canaries, baseline=baseline, probation_s=probation_s, timeout_s=timeout_s, say=say
    )
    if reason is not None:
        history.mark_failed(manifest.name, manifest.version, reason)
        restored = before or history.previous(manifest.name, manifest.version)
        if restored is not None:
            await announce(session, restored)
        else:
            await withdraw(session, manifest.name)
        statuses = await collect_status(session, manifest.name, quiet_s=quiet_s)
        return RolloutResult(manifest, "aborted", canaries, reason, restored, statuses)
    await announce(session, manifest)
    statuses = await collect_status(session, manifest.name, quiet_s=quiet_s)
    return RolloutResult(manifest, "promoted", canaries, statuses=statuses)


async def watch_canaries(
    session: MqttSession,
    manifest: env.Manifest,
    canaries: list[str],
    *,
    baseline: dict[tuple[str, str], env.ModelStatus],
    probation_s: float,
    timeout_s: float,
    say: Say = lambda _: None,
) -> str | None:
    """Wait until every canary has reported ``active`` for this version and stayed so for
    ``probation_s``; return None then, or why not.

    The session must already be subscribed to the model's status topics (collect_status does it).
    A status identical to the baseline is old news (retained from before this push) and ignored,
    except an ``active`` for this very version: that canary already runs it.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout_s
    name, version = manifest.name, manifest.version
    stale = {d: baseline[(d, name)] for d in canaries if (d, name) in baseline}
    active_since: dict[str, float] = {
        d: start for d, s in stale.items() if s.version == version and s.state == "active"
    }
    last: dict[str, str] = {d: "no status yet" for d in canaries}
    spec = topics.MODEL_STATUS
    while True:
        now = loop.time()
        proven = [d for d in canaries if d in active_since and now - active_since[d] >= probation_s]
        if len(proven) == len(canaries):
            return None
        if now >= deadline:
            waiting = ", ".join(f"{d} ({last[d]})" for d in canaries if d not in proven)
            return f"timed out after {timeout_s:g} s waiting for {waiting}"
        wake = min([deadline] + [active_since[d] + probation_s for d in active_since if d not in proven])
        message = await next_message(session, max(0.01, wake - now))
        if message is None:
            continue
        levels = spec.match(str(message.topic))
        if levels is None or levels["model"] != name or levels["device_id"] not in last:
            continue
        device = levels["device_id"]
        try:
            status = env.decode(env.ModelStatus, bytes(message.payload))
        except DecodeError:
            continue
        if status.device_id != device or status.name != name or status == stale.get(device):
            continue
        if status.version != version:
            if device in active_since:
                why = status.reason or "no reason given"
                return f"canary {device} left {version} for {status.version} ({status.state}: {why})"
            continue
        last[device] = status.state
        if status.state in FAILED_STATES:
            return f"canary {device} reported {status.state}: {status.reason or 'no reason given'}"
        if status.state == "active":
            if device not in active_since:
                active_since[device] = loop.time()
                say(f"{device}: {version} active; on probation for {probation_s:g} s")
        else:
            active_since.pop(device, None)


async def rollback(
    session: MqttSession,
    name: str,
    *,
    history: History,
    to: str | None = None,
    quiet_s: float = 0.5,
) -> tuple[env.Manifest, str | None]:
    """Re-announce an earlier version (``to``, or the one pushed before the current): devices that
    still hold it activate it from their store, the others fetch it from the distributor.

    Returns the manifest announced and the version it replaced (None when none was retained).
    The replaced version is marked failed in the history, so a later rollback goes further back.
    """
    delivery.check_model_ids(name, to or "0")
    if not history.versions(name, include_failed=True):
        raise DeliveryError(f"no push history for {name} in {history.root} (push it with `edgewire model push` first)")
    current = await current_manifest(session, name, quiet_s=quiet_s)
    if current is None:
        latest = history.latest(name)
        current_version = latest.version if latest is not None else None
    else:
        current_version = current.version
    if to is not None:
        target = history.get(name, to)
    else:
        if current_version is None:
            raise DeliveryError(f"{name}: nothing announced and no good version in {history.root}")
        found = history.previous(name, current_version)
        if found is None:
            raise DeliveryError(f"{name}: no version before {current_version} in the push history {history.root}")
        target = found
    if target.version == current_version:
        raise DeliveryError(f"{name} {target.version} is already the announced version")
    await announce(session, target)
    if current_version is not None:
        try:
            history.get(name, current_version)
        except DeliveryError:
            pass
        else:
            history.mark_failed(name, current_version, f"rolled back to {target.version} by the operator")
    history.save(target)  # clears a failed mark: it is the current version again
    return target, current_version
