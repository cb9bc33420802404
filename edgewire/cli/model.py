"""``edgewire model`` and ``edgewire distributor``: a model as exported made ready (inspect,
annotate), model versions onto the fleet and back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from edgewire.aio import settle_heap
from edgewire.cli.budgets import (
    DEFAULT_DEVICE_FETCH_BURST,
    DEFAULT_DEVICE_FETCH_RATE,
    DeviceFetchBurstOption,
    DeviceFetchRateOption,
    fetch_limits,
)
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
    help="Inspect and annotate a model as exported; push a version to the fleet over MQTT (optionally behind a "
    "canary), watch it land, roll it back.",
    no_args_is_help=True,
)


def distributor(
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    store: Annotated[Path, typer.Option("--store", help="folder for pushed artefacts")] = Path("model-store"),
    client_id: Annotated[str | None, typer.Option("--id", help="client id (default distributor-<host>)")] = None,
    window: Annotated[int, typer.Option(min=1, help="chunk publishes in flight at once")] = 16,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    metrics_host: Annotated[
        str, typer.Option(help="address /metrics listens on (0.0.0.0: every interface)")
    ] = "127.0.0.1",
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="store only announces signed with this fleet key")
    ] = None,
    fleet_resend_devices: Annotated[
        int,
        typer.Option(
            min=2, help="fetches of one version from this many distinct devices at once are answered on the fleet topic"
        ),
    ] = 3,
    fleet_resend_window_s: Annotated[
        float, typer.Option(min=0.01, help="the window those fetches fall in, and each broadcast chunk's spacing")
    ] = 1.0,
    device_fetch_rate: DeviceFetchRateOption = DEFAULT_DEVICE_FETCH_RATE,
    device_fetch_burst: DeviceFetchBurstOption = DEFAULT_DEVICE_FETCH_BURST,
) -> None:
    """Store every model pushed over MQTT and resend the chunks devices ask for, until stopped."""
    from edgewire import signing
    from edgewire.cloud_bridge.distributor import Distributor
    from edgewire.cloud_bridge.resends import FleetResend
    from edgewire.metrics import serve

    settings = broker_settings(broker_url)
    try:
        fleet_key = signing.load_public(public_key.read_text()) if public_key is not None else None
    except (OSError, EdgewireError) as exc:
        raise fail(exc) from None
    d = Distributor(
        settings,
        store,
        client_id=client_id,
        window=window,
        fleet_key=fleet_key,
        fleet_resend=FleetResend(fleet_resend_devices, fleet_resend_window_s),
        fetch_limits=fetch_limits(device_fetch_rate, device_fetch_burst),
    )
    if metrics_port is not None:
        serve(metrics_port, metrics_host)
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
        async with operator_session(broker, "model") as session:
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
        async with operator_session(broker, "model") as session:
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
        async with operator_session(broker, "model") as session:
            await session.wait_connected(10)
            return await rollout.rollback(session, name, history=history, to=to)

    try:
        target, replaced = asyncio.run(run())
    except EdgewireError as exc:
        raise fail(exc) from None
    out.print(f"{name}: announced {target.version}" + (f" (was {replaced})" if replaced else ""), highlight=False)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{flag} takes numbers separated by commas, e.g. 0.485,0.456,0.406") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise typer.BadParameter("--input-size takes HxW (e.g. 640x640) or one number for a square") from None
    return h, w


@model_app.command("inspect")
def model_inspect(
    file: Annotated[Path, typer.Argument(help="an ONNX model, as exported or already annotated")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """What edgewire reads from a model: its inputs and outputs, the task and output format it
    recognises, the metadata it found (edgewire's or an exporter's), and what is missing with
    the command that fills it. Exits 1 when a device would refuse the model."""
    from edgewire.model_inspect import inspect_report
    from edgewire.modelmeta import GraphInfo, read_model

    try:
        report = inspect_report(read_model(file, GraphInfo.from_file(file)))
    except EdgewireError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        lines = [f"{report['file']}"]
        lines += [f"  input  {t['name']} {_shape(t['shape'])}" for t in report["inputs"]]
        lines += [f"  output {t['name']} {_shape(t['shape'])}" for t in report["outputs"]]
        source = {"edgewire": "edgewire entry", "exporter": "exporter metadata + graph", "graph": "graph only"}
        lines.append(f"  metadata: {source[report['metadata_source']]}")
        for key, value in report["exporter_metadata"].items():
            lines.append(f"    {key}: {value if len(value) <= 100 else value[:97] + '...'}")
        if report["task"]:
            fmt = f", format {report['format']}" if report["format"] else ""
            lines.append(f"  task: {report['task']}{fmt}, {len(report['labels'])} label(s)")
        for key, where in report["inferred"].items():
            lines.append(f"  inferred {key} from {where}")
        if report["missing"]:
            lines.append(f"  missing: {', '.join(report['missing'])}")
        for problem in report["problems"]:
            lines.append(f"  problem: {problem}")
        if report["usable"]:
            lines.append(
                "  a device loads it as it is"
                + ("" if report["metadata_source"] == "edgewire" else f"; to write the entry: {report['fill_command']}")
            )
        else:
            lines.append(f"  a device refuses it; fix: {report['fill_command']}")
        # soft_wrap: the fix command stays one line to copy, whatever the terminal's width.
        out.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
    if not report["usable"]:
        raise typer.Exit(1)


def _shape(shape: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@model_app.command("annotate")
def model_annotate(
    file: Annotated[Path, typer.Argument(help="the ONNX model to annotate")],
    out_file: Annotated[Path, typer.Option("--out", help="where to write the annotated model")],
    task: Annotated[str | None, typer.Option("--task", help="classify or detect (default: from the outputs)")] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="detector output: yolov5, yolov8, end2end or probmap")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="text file, one label per line, class 0 first")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="model name (default: the file's stem)")] = None,
    version: Annotated[str | None, typer.Option("--version", help="model version (default: 1)")] = None,
    input_size: Annotated[
        str | None, typer.Option("--input-size", help="HxW, for inputs the graph leaves open")
    ] = None,
    input_layout: Annotated[str | None, typer.Option("--input-layout", help="NCHW or NHWC")] = None,
    color: Annotated[str | None, typer.Option("--color", help="gray, bgr or rgb")] = None,
    resize: Annotated[str | None, typer.Option("--resize", help="letterbox, stretch or center_crop")] = None,
    scale: Annotated[float | None, typer.Option("--scale", help="pixel multiplier before mean/std (1/255)")] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="per-channel mean after scaling, e.g. 0.5,0.5,0.5")] = None,
    std: Annotated[str | None, typer.Option("--std", help="per-channel std after scaling, e.g. 0.5,0.5,0.5")] = None,
    pad_value: Annotated[int | None, typer.Option("--pad-value", help="letterbox border grey (0-255)")] = None,
    output: Annotated[str | None, typer.Option("--output", help="output tensor to read (default: the first)")] = None,
) -> None:
    """Write edgewire's metadata entry into a copy of a model, inferring all the file allows
    (a standard YOLO export needs no flags); flags state what it cannot say or override it."""
    from edgewire.model_inspect import annotate_model
    from edgewire.modelmeta import Overrides

    choices = {
        "--task": (task, ("classify", "detect")),
        "--format": (fmt, ("yolov5", "yolov8", "end2end", "probmap")),
        "--input-layout": (input_layout, ("NCHW", "NHWC")),
        "--color": (color, ("gray", "bgr", "rgb")),
        "--resize": (resize, ("letterbox", "stretch", "center_crop")),
    }
    for flag, (value, allowed) in choices.items():
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")
    label_list: tuple[str, ...] | None = None
    if labels is not None:
        try:
            label_list = tuple(line.strip() for line in labels.read_text().splitlines() if line.strip())
        except OSError as exc:
            raise fail(exc) from None
    overrides = Overrides(
        name=name,
        version=version,
        task=task,  # type: ignore[arg-type]
        format=fmt,  # type: ignore[arg-type]
        labels=label_list,
        input_size=_size(input_size),
        layout=input_layout,  # type: ignore[arg-type]
        color=color,  # type: ignore[arg-type]
        resize=resize,  # type: ignore[arg-type]
        scale=scale,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        pad_value=pad_value,
        output=output,
    )
    try:
        reading = annotate_model(file, out_file, overrides)
    except EdgewireError as exc:
        raise fail(exc) from None
    meta = reading.meta
    assert meta is not None
    fmt_text = f", format {meta.detect.format}" if meta.detect else ""
    out.print(
        f"wrote {out_file}: {meta.name} {meta.version}, task {meta.task}{fmt_text}, {len(meta.labels)} label(s), "
        f"input {meta.input.name} {list(meta.input.shape)} {meta.input.layout} {meta.input.color} {meta.input.resize}",
        highlight=False,
        markup=False,
    )
