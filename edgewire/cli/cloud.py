"""``edgewire bridge`` and ``edgewire cloud``: serving escalations with Triton."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Annotated

import typer

from edgewire.cli.budgets import (
    DEFAULT_DEVICE_BURST,
    DEFAULT_DEVICE_FETCH_BURST,
    DEFAULT_DEVICE_FETCH_RATE,
    DEFAULT_DEVICE_RATE,
    DeviceBurstOption,
    DeviceFetchBurstOption,
    DeviceFetchRateOption,
    DeviceRateOption,
    fetch_limits,
)
from edgewire.cli.common import broker_settings, console, fail, run_until_signal
from edgewire.errors import EdgewireError


def bridge(
    triton: Annotated[list[str], typer.Option("--triton", help="Triton endpoint(s), grpc://HOST:PORT or http://")],
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    rules_file: Annotated[Path | None, typer.Option("--rules", help="routing rules (YAML)")] = None,
    model: Annotated[str, typer.Option(help="Triton model for every request when no --rules")] = "digits-cloud",
    bridge_id: Annotated[str, typer.Option("--id", help="client id; keep it stable across restarts")] = "bridge-1",
    group: Annotated[str, typer.Option(help="shared-subscription group (MQTT 5 brokers)")] = "bridges",
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    metrics_host: Annotated[
        str, typer.Option(help="address /metrics listens on (0.0.0.0: every interface)")
    ] = "127.0.0.1",
    decode_workers: Annotated[
        int, typer.Option(min=0, help="processes decoding request images beside the event loop; 0: decode on it")
    ] = 1,
    dedupe_db: Annotated[
        Path | None,
        typer.Option(
            "--dedupe-db",
            envvar="EDGEWIRE_BRIDGE_DEDUPE_DB",
            help="SQLite file shared by the bridges of one group on this host: a request runs once across them",
        ),
    ] = None,
    dedupe_lease_s: Annotated[
        float, typer.Option(min=1.0, help="how long a dead bridge's claim on a request holds it (--dedupe-db)")
    ] = 15.0,
    device_rate: DeviceRateOption = DEFAULT_DEVICE_RATE,
    device_burst: DeviceBurstOption = DEFAULT_DEVICE_BURST,
    flood_shield: Annotated[
        bool,
        typer.Option(
            "--flood-shield/--no-flood-shield",
            envvar="EDGEWIRE_BRIDGE_FLOOD_SHIELD",
            help="shut a device flooding past its refusals out at the broker for a cool-off (per-device "
            "subscriptions while it lasts) rather than read and drop its flood here",
        ),
    ] = True,
) -> None:
    """Serve escalations: subscribe to requests, dispatch to Triton, publish results."""
    from edgewire.cloud_bridge.bridge import Bridge
    from edgewire.cloud_bridge.dispatch import Dispatcher
    from edgewire.cloud_bridge.rules import default_rules, load_rules
    from edgewire.cloud_bridge.shared_dedupe import SharedDedupe
    from edgewire.metrics import serve

    settings = broker_settings(broker_url)
    try:
        rules = load_rules(rules_file) if rules_file else default_rules(model)
        dispatcher = Dispatcher(triton)
        shared = None if dedupe_db is None else SharedDedupe(dedupe_db, bridge_id, lease_s=dedupe_lease_s)
    except (EdgewireError, ValueError, sqlite3.Error) as exc:
        raise fail(exc) from None
    if metrics_port is not None:
        serve(metrics_port, metrics_host)
    b = Bridge(
        bridge_id,
        settings,
        dispatcher,
        rules,
        group=group,
        decode_workers=decode_workers,
        shared=shared,
        device_rate_per_s=device_rate,
        device_burst=device_burst,
        flood_shield=flood_shield,
    )
    console.print(f"bridge {bridge_id}: {broker_url} → {', '.join(triton)}")

    async def run() -> None:
        try:
            await b.run()
        finally:
            await dispatcher.close()

    run_until_signal(run, b.stop)


def cloud(
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    data: Annotated[
        Path, typer.Option("--data", help="demo folder (the cloud model is built there if missing)")
    ] = Path("demo-data"),
    model_files: Annotated[list[Path] | None, typer.Option("--model", help="ONNX model(s) to serve")] = None,
    workdir: Annotated[Path, typer.Option(help="Triton model repositories and logs")] = Path("cloud-data"),
    rules_file: Annotated[Path | None, typer.Option("--rules", help="routing rules (YAML)")] = None,
    decode_workers: Annotated[
        int, typer.Option(min=0, help="processes decoding request images beside the event loop; 0: decode on it")
    ] = 1,
    device_rate: DeviceRateOption = DEFAULT_DEVICE_RATE,
    device_burst: DeviceBurstOption = DEFAULT_DEVICE_BURST,
    device_fetch_rate: DeviceFetchRateOption = DEFAULT_DEVICE_FETCH_RATE,
    device_fetch_burst: DeviceFetchBurstOption = DEFAULT_DEVICE_FETCH_BURST,
) -> None:
    """The embedded cloud: a real Triton Inference Server on the cloud model, plus the bridge."""
    from edgewire.cloud_bridge.cloud import EmbeddedCloud
    from edgewire.cloud_bridge.rules import load_rules
    from edgewire.demo.models import build_demo

    settings = broker_settings(broker_url)
    models = list(model_files or [build_demo(data).cloud_model])
    stop = asyncio.Event()

    async def run() -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        rules = load_rules(rules_file) if rules_file else None
        async with EmbeddedCloud(
            settings,
            models,
            workdir,
            rules=rules,
            decode_workers=decode_workers,
            device_rate_per_s=device_rate,
            device_burst=device_burst,
            fetch_limits=fetch_limits(device_fetch_rate, device_fetch_burst),
        ) as c:
            assert c.triton is not None
            console.print(
                f"cloud: Triton {c.triton.grpc_url} serving {', '.join(c.triton.models)}; bridge {c.bridge_id} on "
                f"{broker_url}\nNGC-ready model repository: {c.ngc_repository}"
            )
            await stop.wait()

    try:
        run_until_signal(run, stop.set)
    except EdgewireError as exc:
        raise fail(exc) from None
