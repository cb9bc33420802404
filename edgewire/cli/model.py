"""``edgewire model`` and ``edgewire distributor``: model versions onto the fleet and back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from edgewire.aio import settle_heap
from edgewire.cli.common import (
    BrokerOption,
    HistoryOption,
    broker_settings,
    console,
    fail,
    operator_session,
    out,
    run_until_signal,
)
from edgewire.errors import EdgewireError

model_app = typer.Typer(
    help="Push a model version to the fleet over MQTT (optionally behind a canary), watch it land, roll it back.",
    no_args_is_help=True,
)


def distributor(
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    store: Annotated[Path, typer.Option("--store", help="folder for pushed artefacts")] = Path("model-store"),
    client_id: Annotated[str | None, typer.Option("--id", help="client id (default distributor-<host>)")] = None,
    window: Annotated[int, typer.Option(min=1, help="chunk publishes in flight at once")] = 16,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="store only announces signed with this fleet key")
    ] = None,
) -> None:
    """Store every model pushed over MQTT and resend the chunks devices ask for, until stopped."""
    from edgewire import signing
    from edgewire.cloud_bridge.distributor import Distributor
    from edgewire.metrics import serve

    settings = broker_settings(broker_url)
    try:
        fleet_key = signing.load_public(public_key.read_text()) if public_key is not None else None
    except (OSError, EdgewireError) as exc:
        raise fail(exc) from None
    d = Distributor(settings, store, client_id=client_id, window=window, fleet_key=fleet_key)
    if metrics_port is not None:
        serve(metrics_port)
    console.print(f"distributor {d.client_id}: {broker_url}, store {store}")
    try:
        run_until_signal(d.run, d.stop)
    except (EdgewireError, OSError) as exc:
        raise fail(exc) from None


@model_app.command("push")
def model_push(
    file: Annotated[Path, typer.Argument(help="the artefact: .onnx, or a TensorRT .plan / .engine")],
    name: Annotated[str, typer.Option("--name", help="model name, e.g. digits-edge")],
    version: Annotated[str, typer.Option("--version", help="the version being pushed, e.g. 2026.11.1")],
    targets_devices: Annotated[
        str | None, typer.Option("--targets-devices", help="comma list of device ids or globs (cam-*)")
    ] = None,
    targets_profiles: Annotated[str | None, typer.Option("--targets-profiles", help="comma list of profiles")] = None,
    targets_fleets: Annotated[str | None, typer.Option("--targets-fleets", help="comma list of fleets")] = None,
    canary: Annotated[
        float | None, typer.Option("--canary", help="percent of matching online devices that try it first")
    ] = None,
    probation: Annotated[float, typer.Option(min=0, help="seconds each canary must stay active")] = 10.0,
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the canaries")] = 300.0,
    key: Annotated[Path | None, typer.Option("--key", help="fleet signing key (PKCS#8 PEM, `edgewire keys`)")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="bytes per chunk (at most 4 MiB)")] = 512 * 1024,
    fmt: Annotated[str | None, typer.Option("--format", help="onnx or tensorrt-plan (default: by suffix)")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8")] = "fp32",
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    history_dir: HistoryOption = None,
    no_distributor: Annotated[
        bool, typer.Option("--no-distributor", help="push even when no distributor is online")
    ] = False,
    window: Annotated[int, typer.Option(min=1, help="chunk publishes in flight at once")] = 16,
) -> None:
    """Announce a model version (retained) and send its chunks, straight or behind a canary.

    With --canary P, P % of the matching online devices get it first and the rest follow only after
    each canary ran it through probation; if a canary fails, the previous version is announced again
    and the command exits 1.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgewire import delivery
    from edgewire.fleet import rollout
    from edgewire.fleet.history import History
    from edgewire.fleet.status import format_status_table
    from edgewire.signing import SignatureError, load_private

    broker = broker_settings(broker_url)
    try:
        private = None
        if key is not None:
            try:
                private = load_private(key.read_bytes())
            except OSError as exc:
                raise delivery.DeliveryError(f"{key}: cannot read the signing key ({exc.strerror or exc})") from None
            except SignatureError as exc:
                raise delivery.DeliveryError(f"{key}: {exc}") from None
        targets = delivery.parse_targets(targets_devices, targets_profiles, targets_fleets)
        manifest = delivery.build_manifest(
            file,
            name=name,
            version=version,
            chunk_size=chunk_size,
            targets=targets,
            private_key=private,
            format=fmt,
            precision=precision,
        )
        if canary is not None:
            rollout.check_percent(canary)
    except EdgewireError as exc:
        raise fail(exc) from None
    history = History(history_dir)
    console.print(
        f"{name} {version}: {manifest.size} bytes, {manifest.chunk_count} chunk(s), sha256 {manifest.sha256[:16]}…, "
        f"{'signed' if manifest.signature else 'unsigned'}, for {delivery.describe_targets(targets)}",
        highlight=False,
    )

    async def run() -> Any:
        async with operator_session(broker) as session:
            await session.wait_connected(10)
            columns = (TextColumn("pushing"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task("push", total=manifest.size)

                def progress(done: int, total: int) -> None:
                    bar.update(task, completed=min(done * manifest.chunk_size, manifest.size))

                return await rollout.push_model(
                    session,
                    file,
                    manifest,
                    history=history,
                    canary_percent=canary,
                    probation_s=probation,
                    timeout_s=timeout,
                    require_distributor_online=not no_distributor,
                    window=window,
                    progress=progress,
                    say=lambda line: bar.console.print(line, highlight=False, markup=False),
                )

    try:
        settle_heap()
        result = asyncio.run(run())
    except EdgewireError as exc:
        raise fail(exc) from None
    if result.outcome == "pushed":
        out.print(f"pushed {name} {version} ({manifest.chunk_count} chunks) for {delivery.describe_targets(targets)}")
        return
    out.print(format_status_table(result.statuses), highlight=False, markup=False)
    if result.outcome == "aborted":
        back = f"announce restored to {result.restored.version}" if result.restored else "announce withdrawn"
        console.print(
            f"[bold red]rollout stopped:[/] {escape(result.reason or '')}; {back}; "
            f"{', '.join(result.canaries)} go back, no other device installs {escape(version)}",
            highlight=False,
        )
        raise typer.Exit(1)
    out.print(
        f"canaries {', '.join(result.canaries)} passed; {name} {version} announced to "
        f"{delivery.describe_targets(targets)}",
        highlight=False,
    )


@model_app.command("status")
def model_status(
    name: Annotated[str | None, typer.Argument(help="one model (default: all)")] = None,
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list of rows")] = False,
    wait: Annotated[float, typer.Option(help="seconds to collect retained statuses at most")] = 3.0,
) -> None:
    """Which version each device runs or is getting, from the retained model status topics."""
    from edgewire import delivery
    from edgewire.fleet import status

    broker = broker_settings(broker_url)
    if name is not None:
        try:
            delivery.check_model_ids(name, "0")
        except EdgewireError as exc:
            raise fail(exc) from None

    async def run() -> Any:
        async with operator_session(broker) as session:
            await session.wait_connected(10)
            statuses = await status.collect_status(session, name, timeout_s=wait)
            presences = await status.collect_presence(session, timeout_s=wait)
            return statuses, presences

    try:
        statuses, presences = asyncio.run(run())
    except EdgewireError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(status.status_rows(statuses, presences)))
    else:
        out.print(status.format_status_table(statuses, presences), highlight=False, markup=False)


@model_app.command("rollback")
def model_rollback(
    name: Annotated[str, typer.Argument(help="the model")],
    to: Annotated[str | None, typer.Option("--to", help="version to go back to (default: the one before)")] = None,
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    history_dir: HistoryOption = None,
) -> None:
    """Re-announce an earlier version from the push history; devices that hold it switch back at once."""
    from edgewire.fleet import rollout
    from edgewire.fleet.history import History

    broker = broker_settings(broker_url)
    history = History(history_dir)

    async def run() -> Any:
        async with operator_session(broker) as session:
            await session.wait_connected(10)
            return await rollout.rollback(session, name, history=history, to=to)

    try:
        target, replaced = asyncio.run(run())
    except EdgewireError as exc:
        raise fail(exc) from None
    out.print(f"{name}: announced {target.version}" + (f" (was {replaced})" if replaced else ""), highlight=False)
