"""Following escalations by their hop stamps: find a trace's final outcome on ``local/#`` and
lay out the time it spent at each hop (see edgewire.hops for where the stamps come from)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from edgewire import envelopes as env
from edgewire import topics
from edgewire.errors import DecodeError
from edgewire.hops import steps
from edgewire.session import MqttSession


def is_traced(result: env.LocalResult) -> bool:
    """A final outcome with hop stamps (an escalated frame's; not its PENDING_CLOUD first)."""
    return bool(result.hops) and result.state != "PENDING_CLOUD"


async def collect(
    session: MqttSession,
    *,
    trace_id: str | None = None,
    device_id: str | None = None,
    count: int = 1,
    timeout_s: float | None = None,
) -> list[env.LocalResult]:
    """The next ``count`` traced outcomes seen (of ``device_id``, or the one ``trace_id``);
    fewer when ``timeout_s`` passes first. ``session`` must be connected."""
    topic = topics.LOCAL.build(device_id=device_id) if device_id else topics.LOCAL.filter()
    await session.subscribe(topic, qos=0)
    found: list[env.LocalResult] = []

    async def take() -> None:
        async for message in session.messages():
            if topics.LOCAL.match(str(message.topic)) is None:
                continue
            try:
                batch = env.decode(env.LocalResults, bytes(message.payload))
            except DecodeError:
                continue
            for result in batch.results:
                if is_traced(result) and (trace_id is None or result.trace_id == trace_id):
                    found.append(result)
                    if len(found) >= count:
                        return

    try:
        await asyncio.wait_for(take(), timeout_s)
    except asyncio.TimeoutError:
        pass
    return found


def timeline(result: env.LocalResult) -> dict[str, Any]:
    """One trace as plain data: its steps in order with their milliseconds, and the totals."""
    hops = result.hops or {}
    laid = steps(hops)
    start = hops.get("captured", result.ts)
    return {
        "trace_id": result.trace_id,
        "device_id": result.device_id,
        "state": result.state,
        "answered_by": result.answered_by,
        "model": result.model,
        "latency_ms": result.latency_ms,
        "steps_ms": sum(s.ms for s in laid),
        "steps": [{"hop": s.hop, "what": s.what, "at_ms": (s.end - start) * 1000.0, "ms": s.ms} for s in laid],
    }


def render(timelines: Iterable[dict[str, Any]]) -> str:
    """Timelines as text: one line per step, a bar scaled to the trace's total."""
    lines: list[str] = []
    for t in timelines:
        lines.append(
            f"trace {t['trace_id']} on {t['device_id']}: {t['state'].lower()}, answered by {t['answered_by']} "
            f"({t['model']}), {t['latency_ms']:.1f} ms"
        )
        total = max(t["steps_ms"], 1e-9)
        for s in t["steps"]:
            bar = "█" * max(0, round(16 * s["ms"] / total))
            lines.append(f"  {s['at_ms']:9.2f} ms  {s['what']:<32} {s['ms']:8.2f} ms  {bar}")
        lines.append(f"  {'':9}     {'sum of steps':<32} {t['steps_ms']:8.2f} ms")
    return "\n".join(lines)
