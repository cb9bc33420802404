"""``edgewire trace``: where an escalation spent its time, hop by hop."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from edgewire.cli.common import broker_settings, fail, operator_session, out, run_until_signal


def trace(
    trace_id: Annotated[str | None, typer.Argument(help="the trace to follow (omit with --device)")] = None,
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    device: Annotated[str | None, typer.Option("--device", help="follow this device's escalations")] = None,
    last: Annotated[int, typer.Option("--last", min=1, help="with --device: how many traces to show")] = 1,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds (0: wait for ever)")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per trace")] = False,
) -> None:
    """Show an escalation's timeline (device, outbox, broker, bridge, Triton and back) from the hop
    stamps on its final result. Traces are seen live: run it, then let the device escalate."""
    from edgewire.fleet.trace import collect, render, timeline

    if trace_id is None and device is None:
        raise fail(ValueError("give a TRACE_ID, or --device ID (with --last N)"))
    settings = broker_settings(broker_url)
    stop = asyncio.Event()

    async def run() -> int:
        async with operator_session(settings, "trace") as session:
            await session.wait_connected(10)
            work = asyncio.create_task(
                collect(
                    session,
                    trace_id=trace_id,
                    device_id=device,
                    count=1 if trace_id else last,
                    timeout_s=timeout or None,
                )
            )
            await asyncio.wait([work, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                return 1
            found = work.result()
        timelines = [timeline(r) for r in found]
        if as_json:
            for t in timelines:
                print(json.dumps(t), flush=True)
        else:
            out.print(render(timelines), highlight=False, markup=False, soft_wrap=True)
        return 0 if found else 1

    code = run_until_signal(run, stop.set)
    if code:
        raise typer.Exit(code)
