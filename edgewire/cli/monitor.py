"""``edgewire monitor``: the fleet at a glance, live, from the broker alone.

The rows are :class:`edgewire.fleet.fleet_view.FleetView`'s; this module only subscribes, feeds
it and draws (a rich table redrawn in place, or JSON lines).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgewire.cli.common import broker_settings, fail, operator_session, out, run_until_signal
from edgewire.fleet.fleet_view import DEGRADED, FILTERS, OFFLINE, RESULTS_FILTER, SORT_KEYS, FleetView, Row, summary

STATE_STYLE = {"online": "green", DEGRADED: "yellow", OFFLINE: "red"}


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def state_text(row: Row, now: float) -> str:
    if row.state == OFFLINE and row.offline_since is not None:
        return f"offline {_ago(max(0.0, now - row.offline_since))}"
    return row.state


def summary_line(rows: list[Row]) -> str:
    s = summary(rows)
    return (
        f"fleet: {s['devices']} devices, {s['online']} online, {s[DEGRADED]} degraded, {s[OFFLINE]} offline; "
        f"{s['fps']:.1f} frames/s; {s['rollouts']} rollout steps in flight; {s['bridges']} bridges up"
    )


def table(rows: list[Row], now: float) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    for name, justify in (
        ("CLIENT", "left"),
        ("KIND", "left"),
        ("STATE", "left"),
        ("FLEET", "left"),
        ("MODEL", "left"),
        ("ROLLOUT", "left"),
        ("FPS", "right"),
        ("ESC%", "right"),
        ("LOCAL p50/p99", "right"),
        ("CLOUD p50/p99", "right"),
        ("OUTBOX", "right"),
        ("DROPS", "right"),
        ("ERR", "right"),
        ("CPU%", "right"),
        ("MEM%", "right"),
        ("TEMP", "right"),
    ):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        models = " ".join(f"{n}@{v}" for n, v in sorted(r.models.items())) or "-"
        rollout = "; ".join(f"{n}@{step}" for n, step in sorted(r.rollout.items())) or "-"
        t.add_row(
            r.client_id,
            r.kind,
            Text(state_text(r, now), style=STATE_STYLE.get(r.state, "")),
            r.fleet or "-",
            models,
            rollout,
            _num(r.fps, "{:.1f}"),
            _num(None if r.escalation_rate is None else 100 * r.escalation_rate, "{:.0f}"),
            f"{_num(r.p50_local_ms, '{:.1f}')}/{_num(r.p99_local_ms, '{:.1f}')}",
            f"{_num(r.p50_escalated_ms, '{:.0f}')}/{_num(r.p99_escalated_ms, '{:.0f}')}",
            _num(r.outbox),
            _num(r.drops),
            _num(r.errors),
            _num(r.cpu_percent),
            _num(r.memory_percent),
            _num(r.temperature_c, "{:.0f}C"),
        )
    return t


def monitor(
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    select: Annotated[str | None, typer.Option("--select", help="device ids matching this glob (cam-*)")] = None,
    fleet: Annotated[str | None, typer.Option("--fleet", help="only this fleet")] = None,
    state: Annotated[str | None, typer.Option("--state", help="online, degraded or offline")] = None,
    sort: Annotated[str, typer.Option("--sort", help=f"one of {', '.join(SORT_KEYS)}")] = "id",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: a row per client, then the summary")] = False,
    once: Annotated[bool, typer.Option("--once", help="print one snapshot and exit")] = False,
    settle: Annotated[float, typer.Option(help="--once: seconds to gather retained state and telemetry")] = 3.0,
    refresh: Annotated[float, typer.Option(help="seconds between two redraws")] = 1.0,
    results: Annotated[
        bool, typer.Option("--results", help="also read every result (local/+): a count and liveness between reports")
    ] = False,
) -> None:
    """Watch the fleet: one row per device (state, model, rollout step, rates, latencies, outbox,
    drops, errors, machine), then bridges and the distributor, with a fleet summary line."""
    if sort not in SORT_KEYS:
        raise fail(ValueError(f"--sort must be one of {', '.join(SORT_KEYS)}"))
    if state is not None and state not in ("online", DEGRADED, OFFLINE):
        raise fail(ValueError("--state must be online, degraded or offline"))
    settings = broker_settings(broker_url)
    view = FleetView()
    stop = asyncio.Event()

    def picked() -> list[Row]:
        return view.rows(selector=select, fleet=fleet, state=state, sort=sort)

    def emit_json(now: float) -> None:
        rows = picked()
        for r in rows:
            print(json.dumps({"row": r.as_json(now)}), flush=True)
        print(json.dumps({"summary": summary(rows), "ts": now}), flush=True)

    def screen(now: float) -> Group:
        rows = picked()
        return Group(Text(summary_line(rows), style="bold"), table(rows, now))

    async def feed(session: Any) -> None:
        for topic_filter, qos in (*FILTERS, RESULTS_FILTER) if results else FILTERS:
            await session.subscribe(topic_filter, qos=qos)
        async for message in session.messages():
            view.apply(str(message.topic), bytes(message.payload), time.time())

    async def run() -> None:
        async with operator_session(settings, "monitor") as session:
            await session.wait_connected(10)
            feeding = asyncio.create_task(feed(session))
            try:
                if once:
                    await asyncio.wait_for(stop.wait(), settle) if settle > 0 else None
                elif as_json:
                    while not stop.is_set():
                        emit_json(time.time())
                        await _pause(stop, refresh)
                else:
                    with Live(screen(time.time()), console=out, auto_refresh=False, transient=False) as live:
                        while not stop.is_set():
                            live.update(screen(time.time()), refresh=True)
                            await _pause(stop, refresh)
            except asyncio.TimeoutError:
                pass
            finally:
                feeding.cancel()
        if once:
            now = time.time()
            if as_json:
                emit_json(now)
            else:
                out.print(screen(now))

    run_until_signal(run, stop.set)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
