"""Reading what the fleet reports: retained model statuses, presences and announces, as tables."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from edgewire import envelopes as env
from edgewire import topics
from edgewire.errors import DecodeError
from edgewire.session import InboundMessage, MqttSession


async def next_message(session: MqttSession, timeout: float) -> InboundMessage | None:
    """The next received message, or None after ``timeout`` seconds (nothing is lost on timeout)."""
    if timeout <= 0:
        return None
    stream = session.messages()
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def collect_retained(
    session: MqttSession,
    spec: topics.TopicSpec,
    topic_filter: str,
    *,
    quiet_s: float = 0.5,
    timeout_s: float = 3.0,
) -> dict[str, env.Envelope]:
    """Retained messages of one family: subscribe, then read until the broker has been quiet for
    ``quiet_s`` (retained messages arrive in a burst right after the subscription) or ``timeout_s``.

    Messages of other families on the same session are skipped; malformed ones are skipped too, an
    operator's view must not fail because one device published garbage.
    """
    await session.wait_connected(max(timeout_s, 5.0))
    await session.subscribe(topic_filter, qos=1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    found: dict[str, env.Envelope] = {}
    while True:
        message = await next_message(session, min(quiet_s, deadline - loop.time()))
        if message is None:
            return found
        topic = str(message.topic)
        if spec.match(topic) is None:
            continue
        payload = bytes(message.payload)
        if not payload:  # a cleared retained message
            found.pop(topic, None)
            continue
        try:
            found[topic] = env.decode(spec.payload, payload)
        except DecodeError:
            continue


async def collect_status(
    session: MqttSession, name: str | None, *, quiet_s: float = 0.5, timeout_s: float = 3.0
) -> dict[tuple[str, str], env.ModelStatus]:
    """The retained status of every device for one model (or all models), keyed (device, model)."""
    spec = topics.MODEL_STATUS
    flt = spec.filter(model=name) if name else spec.filter()
    found = await collect_retained(session, spec, flt, quiet_s=quiet_s, timeout_s=timeout_s)
    out: dict[tuple[str, str], env.ModelStatus] = {}
    for topic, status in found.items():
        levels = spec.match(topic) or {}
        assert isinstance(status, env.ModelStatus)
        if status.device_id == levels.get("device_id") and status.name == levels.get("model"):
            out[(status.device_id, status.name)] = status
    return out


async def collect_presence(
    session: MqttSession, *, quiet_s: float = 0.5, timeout_s: float = 3.0
) -> dict[str, env.Presence]:
    """Every retained presence, keyed by client id (online or not: the ``online`` field says)."""
    spec = topics.PRESENCE
    found = await collect_retained(session, spec, spec.filter(), quiet_s=quiet_s, timeout_s=timeout_s)
    out: dict[str, env.Presence] = {}
    for topic, presence in found.items():
        levels = spec.match(topic) or {}
        assert isinstance(presence, env.Presence)
        if presence.client_id == levels.get("client_id"):
            out[presence.client_id] = presence
    return out


async def current_manifest(
    session: MqttSession, name: str, *, quiet_s: float = 0.5, timeout_s: float = 3.0
) -> env.Manifest | None:
    """The retained announce of ``name`` at the broker, if any."""
    spec = topics.MODEL_ANNOUNCE
    topic = spec.build(model=name)
    found = await collect_retained(session, spec, topic, quiet_s=quiet_s, timeout_s=timeout_s)
    manifest = found.get(topic)
    return manifest if isinstance(manifest, env.Manifest) and manifest.name == name else None


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def status_rows(
    statuses: dict[tuple[str, str], env.ModelStatus],
    presences: dict[str, env.Presence] | None = None,
    *,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """One row per device and model, sorted by model then device (the table's and --json's rows)."""
    now = time.time() if now is None else now
    rows = []
    for (device, model), s in sorted(statuses.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, Any] = {
            "device": device,
            "model": model,
            "version": s.version,
            "state": s.state,
            "progress": round(s.progress * 100, 1),
            "reason": s.reason or "",
            "age_s": round(now - s.ts, 1),
        }
        if presences is not None:
            p = presences.get(device)
            row["online"] = None if p is None else p.online
        rows.append(row)
    return rows


def format_status_table(
    statuses: dict[tuple[str, str], env.ModelStatus],
    presences: dict[str, env.Presence] | None = None,
    *,
    now: float | None = None,
) -> str:
    """A plain-text table an operator can read in a terminal, a log or a CI transcript alike."""
    rows = status_rows(statuses, presences, now=now)
    if not rows:
        return "no model status reported"
    headers = ["device", "model", "version", "state", "progress", "reason", "age"]
    if presences is not None:
        headers.insert(1, "online")
    table = [headers]
    for r in rows:
        line = [
            r["device"],
            r["model"],
            r["version"],
            r["state"],
            f"{r['progress']:.0f}%",
            r["reason"],
            _age(r["age_s"]),
        ]
        if presences is not None:
            line.insert(1, {True: "yes", False: "no", None: "?"}[r["online"]])
        table.append(line)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
