"""``edgewire sim``: a simulated fleet in one process, to measure what the wire costs."""

from __future__ import annotations

import asyncio
import json
import resource
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from edgewire.cli.common import BrokerOption, console, fail, out
from edgewire.config import BrokerSettings
from edgewire.errors import EdgewireError


def sim(
    devices: Annotated[int, typer.Option("--devices", min=1, help="simulated devices (one connection each)")] = 100,
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    fleet_file: Annotated[
        Path | None, typer.Option("--fleet", help="ids and credentials from this fleet file, as flash renders them")
    ] = None,
    prefix: Annotated[str, typer.Option(help="device id prefix without --fleet")] = "sim-",
    rate: Annotated[float, typer.Option(min=0, help="escalations per device per second")] = 0.1,
    deadline_ms: Annotated[int, typer.Option(min=1, help="each escalation's deadline")] = 30_000,
    telemetry_s: Annotated[float, typer.Option(min=0.1, help="telemetry period")] = 5.0,
    duration: Annotated[float, typer.Option(min=0, help="seconds to escalate before draining")] = 30.0,
    frames: Annotated[Path | None, typer.Option(help="demo frames folder (default: build the demo)")] = None,
    protocol: Annotated[str, typer.Option(help="3.1.1 or 5")] = "3.1.1",
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
) -> None:
    """Run N simulated devices (real connections, presence, telemetry, escalations of demo frames,
    model downloads; no inference) and report latency, loss and per-device CPU and memory."""
    from edgewire.fleet import sim as simulator
    from edgewire.fleet.sim_device import SimSettings

    if protocol not in ("3.1.1", "5"):
        raise fail(ValueError("--protocol must be 3.1.1 or 5"))
    try:
        broker = BrokerSettings(url=broker_url)
        if fleet_file is not None:
            identities = simulator.identities_from_fleet(fleet_file)[:devices]
        else:
            identities = simulator.anonymous_identities(devices, prefix)
    except (EdgewireError, ValueError) as exc:
        raise fail(exc) from None
    # One socket per device, plus the process's own.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < len(identities) + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, len(identities) + 1024), hard))
    with tempfile.TemporaryDirectory() as tmp:
        if frames is None:
            from edgewire.demo.models import build_demo

            console.print("building the demo frames ...")
            frames = build_demo(Path(tmp) / "demo").frames_dir
        settings = SimSettings(
            host=broker.host,
            port=broker.port,
            protocol=protocol,
            escalations_per_s=rate,
            deadline_ms=deadline_ms,
            telemetry_interval_s=telemetry_s,
        )
        console.print(f"{len(identities)} device(s) connecting to {broker_url} ...")
        summary = asyncio.run(
            simulator.run_fleet(identities, settings, simulator.load_frames(frames), duration_s=duration)
        )
    if as_json:
        out.print_json(json.dumps(summary))
        return
    for key, value in summary.items():
        out.print(f"{key:>24}: {value}", highlight=False)
