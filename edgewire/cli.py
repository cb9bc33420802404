"""The ``edgewire`` command: one entry point for devices, brokers, models and operators."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from edgewire.demo_run import free_port
from edgewire.errors import EdgewireError

app = typer.Typer(help="edgewire: MQTT-first AI inference for fleets of edge devices.", no_args_is_help=True)
edge_app = typer.Typer(help="Run and inspect the device agent.", no_args_is_help=True)
models_app = typer.Typer(help="Build and inspect model artefacts.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")
app.add_typer(models_app, name="models")

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
        async with EmbeddedBroker(host, port, mdns=mdns) as b:
            console.print(f"broker listening on {b.url}" + (" (advertised on mDNS)" if mdns else ""))
            await stop.wait()

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
    from edgewire.metrics import serve

    try:
        cfg = load_device_config(config)
        hook = (lambda r: out.print(_result_line(r), highlight=False)) if print_results else None
        agent = EdgeAgent(cfg, on_result=hook)
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
        doc = envelopes.decode(spec.payload, payload).model_dump(mode="json")
    except EdgewireError as exc:
        return f"{spec.payload.__name__} (rejected)", str(exc)
    for key in ("payload", "data"):
        if key in doc:
            doc[key] = f"<{len(envelopes.decode(spec.payload, payload).model_dump()[key])} bytes>"
    return spec.payload.__name__, doc


# ---- the demo ----------------------------------------------------------------------------


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where demo models and frames are kept")] = Path("demo-data"),
    fps: Annotated[float, typer.Option(help="frames per second the camera plays (0: as fast as possible)")] = 60.0,
    frames: Annotated[int, typer.Option(help="frames to play (0: every held-out frame once)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="end with one JSON summary line")] = False,
) -> None:
    """Embedded broker + one device playing the demo digits, watched by a separate MQTT client."""
    from edgewire.demo_run import run_local_demo

    try:
        summary = asyncio.run(run_local_demo(out_dir, fps=fps, frames=frames or None, console=out, quiet=as_json))
    except EdgewireError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(summary))


def main() -> None:  # pragma: no cover - console script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
