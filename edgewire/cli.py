"""The ``edgewire`` command: one entry point for devices, brokers, models and operators."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from edgewire.aio import settle_heap
from edgewire.errors import EdgewireError
from edgewire.ports import free_port

app = typer.Typer(help="edgewire: MQTT-first AI inference for fleets of edge devices.", no_args_is_help=True)
edge_app = typer.Typer(help="Run and inspect the device agent.", no_args_is_help=True)
models_app = typer.Typer(help="Build and inspect model artefacts.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")
app.add_typer(models_app, name="models")
config_app = typer.Typer(help="Desired configuration over the air, and what devices report.", no_args_is_help=True)
app.add_typer(config_app, name="config")
keys_app = typer.Typer(help="The fleet's model-signing key pair (Ed25519).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
model_app = typer.Typer(
    help="Push a model version to the fleet over MQTT (optionally behind a canary), watch it land, roll it back.",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")

console = Console(stderr=True)
out = Console()


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")] = "warning",
) -> None:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    return typer.Exit(2)


def _run_until_signal(coro_factory: Any, on_signal: Any) -> Any:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await coro_factory()

    settle_heap()
    return asyncio.run(main())


# ---- broker ------------------------------------------------------------------------------


@app.command()
def broker(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    mdns: Annotated[bool, typer.Option("--mdns/--no-mdns", help="advertise _mqtt._tcp over mDNS")] = False,
) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) until interrupted."""
    from edgewire.broker.embedded import EmbeddedBroker

    stop = asyncio.Event()

    async def serve() -> None:
        from edgewire import sdnotify

        async with EmbeddedBroker(host, port, mdns=mdns) as b:
            console.print(f"broker listening on {b.url}" + (" (advertised on mDNS)" if mdns else ""))
            sdnotify.notify(f"READY=1\nSTATUS=listening on {b.url}")
            pings = asyncio.create_task(sdnotify.watchdog())
            await stop.wait()
            pings.cancel()

    try:
        _run_until_signal(serve, stop.set)
    except EdgewireError as exc:
        raise _fail(exc) from None


# ---- device ------------------------------------------------------------------------------


def _result_line(r: Any, truth: int | None = None) -> str:
    mark = ""
    if truth is not None:
        mark = " [green]✓[/]" if r.prediction.label == str(truth) else f" [red]✗ (truth {truth})[/]"
    hard = f" [yellow]hard: {', '.join(r.reasons)}[/]" if r.reasons else ""
    return (
        f"{r.device_id} #{r.seq:<5} {escape(r.source_ref):<16} → {escape(r.prediction.label)} "
        f"({r.prediction.confidence:.2f}) {r.state.lower()} {r.latency_ms:6.1f} ms{hard}{mark}"
    )


@edge_app.command("run")
def edge_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="device configuration file (YAML)")],
    print_results: Annotated[bool, typer.Option("--print/--quiet", help="print every result")] = False,
) -> None:
    """Run a device agent from its configuration until its source ends or it is interrupted."""
    from edgewire.config import load_device_config
    from edgewire.edge.agent import EdgeAgent
    from edgewire.edge.remote_config import boot_config
    from edgewire.edge.state import DeviceState
    from edgewire.metrics import serve

    try:
        file_cfg = load_device_config(config)
        state = DeviceState.beside(config)
        cfg = boot_config(file_cfg, state)  # over-the-air settings accepted before, restart ones included
        hook = (lambda r: out.print(_result_line(r), highlight=False)) if print_results else None
        agent = EdgeAgent(cfg, on_result=hook, boot_config=file_cfg, state=state)
    except EdgewireError as exc:
        raise _fail(exc) from None
    if cfg.metrics_port is not None:
        serve(cfg.metrics_port)
    console.print(
        f"device {cfg.device_id}: model {agent.meta.name} {agent.meta.version}, broker {cfg.broker.url}, "
        f"mode {agent.mode}" + (" (no cloud configured)" if agent.mode == "local-only" else "")
    )
    summary = _run_until_signal(agent.run, agent.stop)
    console.print(
        f"done: {summary.completed} frames in {summary.elapsed_s:.2f} s ({summary.fps:.0f} fps), "
        f"{summary.hard} hard, {summary.failed} failed, {summary.rejected} messages rejected"
    )


# ---- cloud -------------------------------------------------------------------------------


def _broker_settings(url: str) -> Any:
    from edgewire.config import BrokerSettings

    try:
        return BrokerSettings(url=url)
    except Exception as exc:
        raise _fail(exc) from None


@app.command()
def bridge(
    triton: Annotated[list[str], typer.Option("--triton", help="Triton endpoint(s), grpc://HOST:PORT or http://")],
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    rules_file: Annotated[Path | None, typer.Option("--rules", help="routing rules (YAML)")] = None,
    model: Annotated[str, typer.Option(help="Triton model for every request when no --rules")] = "digits-cloud",
    bridge_id: Annotated[str, typer.Option("--id", help="client id; keep it stable across restarts")] = "bridge-1",
    group: Annotated[str, typer.Option(help="shared-subscription group (MQTT 5 brokers)")] = "bridges",
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    decode_workers: Annotated[
        int, typer.Option(min=0, help="processes decoding request images beside the event loop; 0: decode on it")
    ] = 1,
) -> None:
    """Serve escalations: subscribe to requests, dispatch to Triton, publish results."""
    from edgewire.cloud_bridge.bridge import Bridge
    from edgewire.cloud_bridge.dispatch import Dispatcher
    from edgewire.cloud_bridge.rules import default_rules, load_rules
    from edgewire.metrics import serve

    settings = _broker_settings(broker_url)
    try:
        rules = load_rules(rules_file) if rules_file else default_rules(model)
        dispatcher = Dispatcher(triton)
    except (EdgewireError, ValueError) as exc:
        raise _fail(exc) from None
    if metrics_port is not None:
        serve(metrics_port)
    b = Bridge(bridge_id, settings, dispatcher, rules, group=group, decode_workers=decode_workers)
    console.print(f"bridge {bridge_id}: {broker_url} → {', '.join(triton)}")

    async def run() -> None:
        try:
            await b.run()
        finally:
            await dispatcher.close()

    _run_until_signal(run, b.stop)


@app.command()
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
) -> None:
    """The embedded cloud: a real Triton Inference Server on the cloud model, plus the bridge."""
    from edgewire.cloud_bridge.cloud import EmbeddedCloud
    from edgewire.cloud_bridge.rules import load_rules
    from edgewire.demo_models import build_demo

    settings = _broker_settings(broker_url)
    models = list(model_files or [build_demo(data).cloud_model])
    stop = asyncio.Event()

    async def run() -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        rules = load_rules(rules_file) if rules_file else None
        async with EmbeddedCloud(settings, models, workdir, rules=rules, decode_workers=decode_workers) as c:
            assert c.triton is not None
            console.print(
                f"cloud: Triton {c.triton.grpc_url} serving {', '.join(c.triton.models)}; bridge {c.bridge_id} on "
                f"{broker_url}\nNGC-ready model repository: {c.ngc_repository}"
            )
            await stop.wait()

    try:
        _run_until_signal(run, stop.set)
    except EdgewireError as exc:
        raise _fail(exc) from None


# ---- models ------------------------------------------------------------------------------


@models_app.command("demo")
def models_demo(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for models/ and frames/")] = Path("demo-data"),
    image_format: Annotated[str, typer.Option("--format", help="jpg or png")] = "jpg",
) -> None:
    """Train the demo edge and cloud models on scikit-learn's digits and write the held-out frames."""
    from edgewire.demo_models import build_demo

    arts = build_demo(out_dir, image_format=image_format, progress=lambda m: console.print(f"… {m}"))
    out.print(f"edge model   {arts.edge_model}  accuracy {arts.edge_accuracy:.3f}")
    out.print(f"cloud model  {arts.cloud_model}  accuracy {arts.cloud_accuracy:.3f}")
    out.print(f"frames       {arts.frames_dir}")


# ---- operators ---------------------------------------------------------------------------


@app.command()
def watch(
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    topic: Annotated[list[str], typer.Option("--topic", "-t", help="filter(s) to subscribe to")] = ["#"],  # noqa: B006
    count: Annotated[int, typer.Option(help="stop after this many messages (0: never)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Subscribe and print every edgewire message, decoded; malformed ones are shown as such."""
    from edgewire import envelopes, topics
    from edgewire.config import BrokerSettings
    from edgewire.session import MqttSession

    try:
        settings = BrokerSettings(url=broker_url)
    except Exception as exc:
        raise _fail(exc) from None
    stop = asyncio.Event()

    async def run() -> None:
        seen = 0
        async with MqttSession(f"watch-{socket.gethostname()[:20]}-{free_port()}", settings.host, settings.port) as s:
            for f in topic:
                await s.subscribe(f, qos=1)
            async for msg in s.messages():
                name, doc = _describe(str(msg.topic), bytes(msg.payload), envelopes, topics)
                if as_json:
                    out.print_json(json.dumps({"topic": str(msg.topic), "kind": name, "payload": doc}, default=str))
                else:
                    out.print(f"[bold]{msg.topic}[/] {name} {doc}", highlight=False)
                seen += 1
                if (count and seen >= count) or stop.is_set():
                    return

    async def main() -> None:
        task = asyncio.create_task(run())
        await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        task.cancel()

    _run_until_signal(main, stop.set)


def _describe(topic: str, payload: bytes, envelopes: Any, topics: Any) -> tuple[str, Any]:
    try:
        spec = topics.parse(topic).spec
    except EdgewireError:
        return "unknown-topic", f"{len(payload)} bytes"
    try:
        message = envelopes.decode(spec.payload, payload)
    except EdgewireError as exc:
        return f"{spec.payload.__name__} (rejected)", str(exc)
    doc = message.model_dump(mode="json")
    for key in ("payload", "data"):
        if key in doc:
            doc[key] = f"<{len(getattr(message, key))} bytes>"
    return spec.payload.__name__, doc


@app.command()
def discover(
    interface: Annotated[
        list[str], typer.Option("--interface", "-i", help="IPv4 address of an interface to query, or 'all'")
    ] = ["all"],  # noqa: B006
    timeout: Annotated[float, typer.Option(help="seconds to listen for answers")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """List MQTT brokers (_mqtt._tcp) and edgewire devices (_edgewire._tcp) on the link, by mDNS."""
    from rich.table import Table

    from edgewire.mdns import EDGEWIRE_SERVICE, MQTT_SERVICE, browse

    async def run() -> tuple[list[Any], list[Any]]:
        brokers, devices = await asyncio.gather(
            browse(MQTT_SERVICE, timeout=timeout, interfaces=interface),
            browse(EDGEWIRE_SERVICE, timeout=timeout, interfaces=interface),
        )
        return brokers, devices

    try:
        brokers, devices = asyncio.run(run())
    except EdgewireError as exc:
        raise _fail(exc) from None
    if as_json:
        doc = {
            "brokers": [{"name": b.instance, "host": b.host, "port": b.port, "txt": b.properties} for b in brokers],
            "devices": [{"name": d.instance, "host": d.host, "port": d.port, "txt": d.properties} for d in devices],
        }
        print(json.dumps(doc))
        return
    table = Table(title=f"mDNS on {', '.join(interface)}")
    for col in ("kind", "name", "address", "details"):
        table.add_column(col)
    for b in brokers:
        table.add_row("broker", b.instance, f"{b.host}:{b.port}", " ".join(f"{k}={v}" for k, v in b.properties.items()))
    for d in devices:
        table.add_row("device", d.instance, d.host, " ".join(f"{k}={v}" for k, v in d.properties.items()))
    out.print(table)


async def _retained(broker: Any, topic_names: list[str], wait_s: float = 1.5) -> dict[str, bytes]:
    """The retained message on each topic (absent when none arrives within ``wait_s``)."""
    from edgewire.session import MqttSession

    found: dict[str, bytes] = {}
    async with MqttSession(f"operator-{free_port()}", broker.host, broker.port) as s:
        await s.wait_connected(10)
        for name in topic_names:
            await s.subscribe(name, qos=1)

        async def collect() -> None:
            async for msg in s.messages():
                found[str(msg.topic)] = bytes(msg.payload)
                if len(found) == len(topic_names):
                    return

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collect(), wait_s)
    return found


def _target_topics(device: str | None, fleet: str | None) -> tuple[str, str | None]:
    from edgewire import topics

    if (device is None) == (fleet is None):
        raise _fail(ValueError("give exactly one of --device or --fleet"))
    if fleet is not None:
        return topics.CONFIG_FLEET.build(fleet=fleet), None
    assert device is not None
    return topics.CONFIG_DESIRED.build(device_id=device), topics.CONFIG_REPORTED.build(device_id=device)


@config_app.command("set")
def config_set(
    settings: Annotated[list[str], typer.Argument(help="dotted.key=value, e.g. judge.min_confidence=0.6")],
    device: Annotated[str | None, typer.Option(help="one device")] = None,
    fleet: Annotated[str | None, typer.Option(help="every device of a fleet")] = None,
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
) -> None:
    """Merge settings into the retained desired configuration and bump its revision."""
    import time

    import yaml

    from edgewire import envelopes
    from edgewire.config import deep_merge

    broker = _broker_settings(broker_url)
    desired_topic, _ = _target_topics(device, fleet)
    updates: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise _fail(ValueError(f"{item!r}: expected dotted.key=value"))
        node = updates
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)

    async def run() -> Any:
        from edgewire.session import MqttSession

        current = (await _retained(broker, [desired_topic])).get(desired_topic)
        doc = envelopes.decode(envelopes.DesiredConfig, current) if current else None
        config = deep_merge(doc.config if doc else {}, updates)
        new = envelopes.DesiredConfig(revision=(doc.revision if doc else 0) + 1, config=config, ts=time.time())
        async with MqttSession(f"operator-{free_port()}", broker.host, broker.port) as s:
            await s.wait_connected(10)
            await s.publish(desired_topic, envelopes.encode(new), qos=1, retain=True, timeout=10)
        return new

    try:
        new = asyncio.run(run())
    except EdgewireError as exc:
        raise _fail(exc) from None
    out.print(f"{desired_topic} revision {new.revision}: {json.dumps(new.config)}", highlight=False)


@config_app.command("get")
def config_get(
    device: Annotated[str | None, typer.Option(help="one device")] = None,
    fleet: Annotated[str | None, typer.Option(help="a fleet's desired configuration")] = None,
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
) -> None:
    """Print the desired configuration and, for a device, what it reported."""
    from edgewire import envelopes

    broker = _broker_settings(broker_url)
    desired_topic, reported_topic = _target_topics(device, fleet)
    names = [desired_topic] + ([reported_topic] if reported_topic else [])
    try:
        found = asyncio.run(_retained(broker, names))
    except EdgewireError as exc:
        raise _fail(exc) from None
    doc: dict[str, Any] = {}
    if desired_topic in found:
        doc["desired"] = envelopes.decode(envelopes.DesiredConfig, found[desired_topic]).model_dump(mode="json")
    if reported_topic and reported_topic in found:
        doc["reported"] = envelopes.decode(envelopes.ReportedConfig, found[reported_topic]).model_dump(mode="json")
    print(json.dumps(doc))


@app.command()
def flash(
    fleet_file: Annotated[Path, typer.Option("--fleet", help="fleet template (YAML)")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="one folder per device under this one")] = None,
    target: Annotated[Path | None, typer.Option("--target", help="a device's root filesystem (one device)")] = None,
    devices: Annotated[str | None, typer.Option("--devices", help="glob on device ids, e.g. 'cam-*'")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the diff, write nothing")] = False,
) -> None:
    """Render a fleet template into each device's files: validated first, written atomically."""
    from rich.progress import Progress

    from edgewire import flash as flasher

    if (out_dir is None) == (target is None):
        raise _fail(ValueError("give exactly one of --out DIR or --target ROOTFS"))
    try:
        rendered = flasher.render(fleet_file, devices)
    except EdgewireError as exc:
        raise _fail(exc) from None
    if target is not None and len(rendered) != 1:
        raise _fail(ValueError(f"--target writes one device; {len(rendered)} match (narrow with --devices)"))
    root = out_dir if out_dir is not None else target
    assert root is not None
    changes = list(flasher.plan(rendered, root, per_device_dirs=out_dir is not None))
    if dry_run:
        for change in changes:
            out.print(change.diff(), highlight=False, markup=False, end="")
        console.print(f"dry run: {len(changes)} file(s) of {len(rendered)} device(s) would change")
        return
    if not changes:
        console.print(f"{len(rendered)} device(s) rendered; nothing changed")
        return
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("writing", total=len(changes))
        flasher.write(changes, lambda _: progress.advance(task))
    touched = len({c.device_id for c in changes})
    console.print(f"{len(rendered)} device(s) rendered; {len(changes)} file(s) written for {touched} device(s)")


@keys_app.command("generate")
def keys_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for fleet-signing.key and fleet-signing.pub")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing key pair")] = False,
) -> None:
    """Make the fleet's signing key pair; the .pub line goes into the fleet file (signing_public_key)."""
    import os

    from edgewire.signing import generate

    private_path, public_path = out_dir / "fleet-signing.key", out_dir / "fleet-signing.pub"
    if private_path.exists() and not force:
        raise _fail(FileExistsError(f"{private_path} exists; models signed with it would stop verifying (--force)"))
    private, public = generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_text(public + "\n")
    console.print(f"private key {private_path} (keep it off devices); public key {public_path}:")
    out.print(public, highlight=False)


@keys_app.command("show")
def keys_show(key: Annotated[Path, typer.Option("--key", help="private key file")]) -> None:
    """Print the public line of a private key (to put into a fleet file)."""
    from edgewire.signing import SignatureError, load_private, public_line

    try:
        out.print(public_line(load_private(key.read_bytes()).public_key()), highlight=False)
    except (OSError, SignatureError) as exc:
        raise _fail(exc) from None


# ---- model delivery ----------------------------------------------------------------------

BrokerOption = Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")]
HistoryOption = Annotated[
    Path | None,
    typer.Option("--history", help="push history (default $EDGEWIRE_HOME/models, ~/.local/share/edgewire/models)"),
]


@app.command()
def distributor(
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    store: Annotated[Path, typer.Option("--store", help="folder for pushed artefacts")] = Path("model-store"),
    client_id: Annotated[str | None, typer.Option("--id", help="client id (default distributor-<host>)")] = None,
    window: Annotated[int, typer.Option(min=1, help="chunk publishes in flight at once")] = 16,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
) -> None:
    """Store every model pushed over MQTT and resend the chunks devices ask for, until stopped."""
    from edgewire.cloud_bridge.distributor import Distributor
    from edgewire.metrics import serve

    settings = _broker_settings(broker_url)
    d = Distributor(settings, store, client_id=client_id, window=window)
    if metrics_port is not None:
        serve(metrics_port)
    console.print(f"distributor {d.client_id}: {broker_url}, store {store}")
    try:
        _run_until_signal(d.run, d.stop)
    except (EdgewireError, OSError) as exc:
        raise _fail(exc) from None


def _operator_session(broker: Any) -> Any:
    from edgewire.session import MqttSession

    b = broker
    return MqttSession(f"operator-{free_port()}", b.host, b.port, username=b.username, password=b.password)


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

    from edgewire import delivery, rollout
    from edgewire.signing import SignatureError, load_private

    broker = _broker_settings(broker_url)
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
        raise _fail(exc) from None
    history = delivery.History(history_dir)
    console.print(
        f"{name} {version}: {manifest.size} bytes, {manifest.chunk_count} chunk(s), sha256 {manifest.sha256[:16]}…, "
        f"{'signed' if manifest.signature else 'unsigned'}, for {delivery.describe_targets(targets)}",
        highlight=False,
    )

    async def run() -> Any:
        async with _operator_session(broker) as session:
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
        raise _fail(exc) from None
    if result.outcome == "pushed":
        out.print(f"pushed {name} {version} ({manifest.chunk_count} chunks) for {delivery.describe_targets(targets)}")
        return
    out.print(delivery.format_status_table(result.statuses), highlight=False, markup=False)
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

    broker = _broker_settings(broker_url)
    if name is not None:
        try:
            delivery.check_model_ids(name, "0")
        except EdgewireError as exc:
            raise _fail(exc) from None

    async def run() -> Any:
        async with _operator_session(broker) as session:
            await session.wait_connected(10)
            statuses = await delivery.collect_status(session, name, timeout_s=wait)
            presences = await delivery.collect_presence(session, timeout_s=wait)
            return statuses, presences

    try:
        statuses, presences = asyncio.run(run())
    except EdgewireError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(delivery.status_rows(statuses, presences)))
    else:
        out.print(delivery.format_status_table(statuses, presences), highlight=False, markup=False)


@model_app.command("rollback")
def model_rollback(
    name: Annotated[str, typer.Argument(help="the model")],
    to: Annotated[str | None, typer.Option("--to", help="version to go back to (default: the one before)")] = None,
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    history_dir: HistoryOption = None,
) -> None:
    """Re-announce an earlier version from the push history; devices that hold it switch back at once."""
    from edgewire import delivery, rollout

    broker = _broker_settings(broker_url)
    history = delivery.History(history_dir)

    async def run() -> Any:
        async with _operator_session(broker) as session:
            await session.wait_connected(10)
            return await rollout.rollback(session, name, history=history, to=to)

    try:
        target, replaced = asyncio.run(run())
    except EdgewireError as exc:
        raise _fail(exc) from None
    out.print(f"{name}: announced {target.version}" + (f" (was {replaced})" if replaced else ""), highlight=False)


# ---- the demo ----------------------------------------------------------------------------


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where demo models and frames are kept")] = Path("demo-data"),
    devices: Annotated[int, typer.Option(help="simulated devices")] = 2,
    seconds: Annotated[float, typer.Option(help="run this long, looping the frames (0: play them once)")] = 0.0,
    fps: Annotated[float, typer.Option(help="frames per second each camera plays")] = 30.0,
    cloud: Annotated[bool, typer.Option("--cloud/--no-cloud", help="start Triton and the bridge")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="no live view; end with one JSON summary line")] = False,
) -> None:
    """Embedded broker, embedded cloud (Triton + bridge) and N devices playing the demo digits."""
    from edgewire.demo_run import run_demo

    try:
        summary = asyncio.run(
            run_demo(out_dir, devices=devices, seconds=seconds, fps=fps, cloud=cloud, console=out, quiet=as_json)
        )
    except EdgewireError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(summary))


@app.command("eval")
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="demo folder (models/ and frames/)")] = Path("demo-data"),
    lo: Annotated[float, typer.Option("--from", help="lowest min_confidence threshold")] = 0.3,
    hi: Annotated[float, typer.Option("--to", help="highest threshold")] = 0.99,
    step: Annotated[float, typer.Option(help="threshold step")] = 0.05,
    budget: Annotated[float, typer.Option(help="largest escalation rate you can afford (0-1)")] = 0.2,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Replay the labelled demo set through the judge at many thresholds: accuracy vs escalation and bytes."""
    from rich.table import Table

    from edgewire.demo_models import build_demo, label_of
    from edgewire.evaluate import replay

    arts = build_demo(data)
    frames = sorted(p for p in arts.frames_dir.iterdir() if p.suffix in (".jpg", ".png"))
    result = replay(frames, label_of, arts.edge_model, arts.cloud_model)
    thresholds = [round(t, 4) for t in np.arange(lo, hi + 1e-9, step)]
    rows = result.table(thresholds)
    best = result.best_within(budget, thresholds)
    if as_json:
        print(
            json.dumps(
                {
                    "frames": len(frames),
                    "accuracy_edge": result.edge_accuracy,
                    "accuracy_cloud": result.cloud_accuracy,
                    "rows": [r.__dict__ for r in rows],
                    "budget": budget,
                    "best": best.__dict__ if best else None,
                }
            )
        )
        return
    table = Table(
        title=f"{len(frames)} labelled frames · edge {result.edge_accuracy:.1%} · cloud {result.cloud_accuracy:.1%}"
    )
    for col in ("min_confidence", "escalated", "joint accuracy", "KiB sent up"):
        table.add_column(col, justify="right")
    for r in rows:
        mark = " ◀" if best is not None and r.threshold == best.threshold else ""
        table.add_row(
            f"{r.threshold:.2f}{mark}", f"{r.escalation_rate:.1%}", f"{r.accuracy:.1%}", f"{r.bytes_sent / 1024:.0f}"
        )
    out.print(table)
    if best is None:
        out.print(f"no threshold keeps escalation within {budget:.0%}")
    else:
        out.print(
            f"within a {budget:.0%} escalation budget: judge.min_confidence = {best.threshold:.2f} "
            f"({best.escalation_rate:.1%} escalated, {best.accuracy:.1%} accurate)"
        )


def main() -> None:  # pragma: no cover - console script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
