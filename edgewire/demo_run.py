"""The whole system on embedded defaults: what ``edgewire demo`` runs.

Everything is real: an amqtt broker on a free loopback port, a device agent playing the demo
digits through its full pipeline, and a separate MQTT client that watches ``local/+`` and
scores what the device published against the true labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from edgewire import envelopes as env
from edgewire import topics
from edgewire.config import BrokerSettings, DeviceConfig, ModelSettings, SourceSettings
from edgewire.demo_models import DemoArtifacts, build_demo, label_of
from edgewire.session import MqttSession


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_demo(out_dir: Path, console: Console | None = None) -> DemoArtifacts:
    """Build the demo models and frames once; later runs reuse them."""
    return build_demo(out_dir, progress=(lambda m: console.print(f"… {m}")) if console else None)


def demo_device_config(
    arts: DemoArtifacts, broker_url: str, *, device_id: str = "cam-01", fps: float = 0.0, frames: int | None = None
) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id,
        broker=BrokerSettings(url=broker_url),
        source=SourceSettings(kind="folder", path=arts.frames_dir, fps=fps, max_frames=frames),
        model=ModelSettings(path=arts.edge_model),
    )


def write_config(cfg: DeviceConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False))


async def run_local_demo(
    out_dir: Path, *, fps: float = 60.0, frames: int | None = None, console: Console, quiet: bool = False
) -> dict[str, Any]:
    from edgewire.broker.embedded import EmbeddedBroker
    from edgewire.edge.agent import EdgeAgent

    models_ready = (out_dir / "models" / "digits-edge.onnx").exists() and (out_dir / "frames" / "labels.json").exists()
    arts = build_demo(out_dir, progress=None if quiet or models_ready else (lambda m: console.print(f"… {m}")))
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    received: list[env.LocalResult] = []
    expected: list[int] = []
    all_in = asyncio.Event()
    async with EmbeddedBroker("127.0.0.1", port):
        cfg = demo_device_config(arts, url, fps=fps, frames=frames)
        write_config(cfg, out_dir / "device.yaml")
        if not quiet:
            console.print(f"broker {url} · device {cfg.device_id} · model {arts.edge_model.name} · local-only")
        async with MqttSession("demo-monitor", "127.0.0.1", port) as monitor:
            await monitor.wait_connected(10)
            await monitor.subscribe(topics.LOCAL.filter(), qos=0)

            async def watch() -> None:
                async for msg in monitor.messages():
                    batch = env.decode(env.LocalResults, msg.payload)
                    received.extend(batch.results)
                    if expected and len(received) >= expected[0]:
                        all_in.set()
                    for result in [] if quiet else batch.results:
                        truth = label_of(Path(result.source_ref))
                        ok = "[green]✓[/]" if result.prediction.label == str(truth) else f"[red]✗ truth {truth}[/]"
                        hard = f" [yellow]hard: {', '.join(result.reasons)}[/]" if result.reasons else ""
                        console.print(
                            f"{result.device_id} {result.source_ref:<14} → {result.prediction.label} "
                            f"({result.prediction.confidence:.2f}) {ok}{hard}",
                            highlight=False,
                        )

            watcher = asyncio.create_task(watch())
            summary = await EdgeAgent(cfg).run()
            expected.append(summary.completed)
            if len(received) < summary.completed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(all_in.wait(), 5)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    correct = sum(r.prediction.label == str(label_of(Path(r.source_ref))) for r in received)
    correct_easy = sum(r.prediction.label == str(label_of(Path(r.source_ref))) for r in received if not r.reasons)
    easy = sum(1 for r in received if not r.reasons)
    result = {
        "frames": summary.completed,
        "received_by_monitor": len(received),
        "hard": summary.hard,
        "hard_rate": round(summary.hard / summary.completed, 4) if summary.completed else 0.0,
        "accuracy_edge": round(correct / len(received), 4) if received else 0.0,
        "accuracy_edge_confident": round(correct_easy / easy, 4) if easy else 0.0,
        "fps": round(summary.fps, 1),
        "failed": summary.failed,
        "mode": summary.mode,
    }
    if not quiet:
        console.print(
            f"\n[bold]{result['frames']} frames[/] at {result['fps']} fps · edge accuracy {result['accuracy_edge']:.1%}"
            f" · {result['hard']} hard cases ({result['hard_rate']:.1%}) answered locally (no cloud configured)"
            f" · accuracy on confident frames {result['accuracy_edge_confident']:.1%}"
            f"\nconfig written to {out_dir / 'device.yaml'}; run it with "
            f"`edgewire edge run -c {out_dir / 'device.yaml'}`"
        )
    return result
