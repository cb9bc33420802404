"""The whole system on embedded defaults: what ``edgewire demo`` runs.

Everything is real: an amqtt broker on a free loopback port, a Triton Inference Server serving
the demo cloud model behind the bridge, N device agents playing the held-out digits through
their full pipeline and escalating the hard ones, and a separate MQTT client that watches
``local/+`` and scores what the devices published against the true labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgewire import envelopes as env
from edgewire import topics
from edgewire.aio import cancel_and_wait
from edgewire.config import BrokerSettings, CloudSettings, DeviceConfig, ModelSettings, SourceSettings
from edgewire.demo.models import DemoArtifacts, build_demo, label_of
from edgewire.ports import free_port
from edgewire.session import MqttSession

#: How long a device waits for the cloud's answer before its own answer stands.
DEFAULT_CLOUD_DEADLINE_MS = 2000
#: Where the configuration the demo leaves behind looks for a broker: ``edgewire broker``'s default.
STANDALONE_BROKER = "mqtt://127.0.0.1:1883"


def demo_device_config(
    arts: DemoArtifacts,
    broker_url: str,
    *,
    device_id: str = "cam-01",
    fps: float = 0.0,
    frames: int | None = None,
    loop: bool = False,
    cloud: bool = True,
    cloud_deadline_ms: int = DEFAULT_CLOUD_DEADLINE_MS,
) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id,
        fleet="demo",
        broker=BrokerSettings(url=broker_url),
        source=SourceSettings(kind="folder", path=arts.frames_dir, fps=fps, max_frames=frames, loop=loop),
        model=ModelSettings(path=arts.edge_model),
        cloud=CloudSettings(deadline_ms=cloud_deadline_ms, model_hint="digits") if cloud else None,
    )


def write_standalone_config(arts: DemoArtifacts, path: Path) -> None:
    """A device configuration that runs after the demo has stopped: the broker is the default
    one (``edgewire broker`` on 127.0.0.1:1883, not the demo's, which is gone), the frames play
    once, and paths are relative to the file's own folder, as the device loader reads them."""
    folder = path.absolute().parent
    cfg = demo_device_config(arts, STANDALONE_BROKER, fps=30.0)
    doc = cfg.model_dump(mode="json", exclude_defaults=True)
    doc["model"]["path"] = os.path.relpath(arts.edge_model.absolute(), folder)
    doc["source"]["path"] = os.path.relpath(arts.frames_dir.absolute(), folder)
    path.write_text(
        f"# The demo's first device, for a broker on {STANDALONE_BROKER}\n"
        "# (start one with `edgewire broker --allow-anonymous`)\n"
        "# and, for escalations, the demo cloud (`edgewire cloud --data <this folder>`). Paths are relative\n"
        "# to this file. Run it with: edgewire edge run --config <this file> --print\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@dataclass
class Scoreboard:
    """What the monitor saw, scored against the true labels."""

    edge_answer: dict[str, bool] = field(default_factory=dict)  # trace_id -> edge model right?
    final: dict[str, env.LocalResult] = field(default_factory=dict)
    per_device: dict[str, dict[str, int]] = field(default_factory=dict)
    escalated_ids: set[str] = field(default_factory=set)

    def add(self, result: env.LocalResult) -> None:
        if result.prediction is None:  # the digits demo classifies; a detection row is not scored here
            return
        right = result.prediction.label == str(label_of(Path(result.source_ref)))
        if result.answered_by == "edge" and result.trace_id not in self.edge_answer:
            self.edge_answer[result.trace_id] = right
        if result.state == "PENDING_CLOUD":
            self.escalated_ids.add(result.trace_id)
            return
        self.final[result.trace_id] = result
        dev = self.per_device.setdefault(result.device_id, {"frames": 0, "escalated": 0, "timeouts": 0, "right": 0})
        dev["frames"] += 1
        dev["escalated"] += result.trace_id in self.escalated_ids
        dev["timeouts"] += result.state == "TIMEOUT"
        dev["right"] += right

    def table(self, title: str) -> Table:
        t = Table(
            title=title,
            caption=(
                "escalated: sent to the cloud\n"
                "timeouts: no cloud answer in time\n"
                "accuracy: final answers vs true labels"
            ),
        )
        for col in ("device", "frames", "escalated", "timeouts", "accuracy"):
            t.add_column(col, justify="right")
        for device, d in sorted(self.per_device.items()):
            acc = d["right"] / d["frames"] if d["frames"] else 0.0
            t.add_row(device, str(d["frames"]), str(d["escalated"]), str(d["timeouts"]), f"{acc:.1%}")
        return t


def cloud_only_accuracy(arts: DemoArtifacts, refs: list[str]) -> float:
    """Accuracy had every frame gone to the cloud model (scored locally, same preprocessing)."""
    from edgewire.demo.evaluate import predict_files

    names = sorted(set(refs))
    probs = predict_files(arts.cloud_model, [arts.frames_dir / n for n in names])
    right = {n: int(np.argmax(row)) == label_of(Path(n)) for n, row in zip(names, probs, strict=True)}
    return sum(right[r] for r in refs) / len(refs) if refs else 0.0


async def run_demo(
    out_dir: Path,
    *,
    devices: int = 2,
    seconds: float = 0.0,
    fps: float = 30.0,
    cloud: bool = True,
    cloud_deadline_ms: int = DEFAULT_CLOUD_DEADLINE_MS,
    console: Console,
    quiet: bool = False,
) -> dict[str, Any]:
    from edgewire.broker.embedded import EmbeddedBroker
    from edgewire.edge.agent import EdgeAgent

    say = (lambda m: None) if quiet else (lambda m: console.print(m, highlight=False))
    arts = build_demo(out_dir, progress=None if quiet else (lambda m: say(f"… {m}")))
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    board = Scoreboard()
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(EmbeddedBroker("127.0.0.1", port, allow_anonymous=True))
        say(f"broker {url}")
        if cloud:
            from edgewire.cloud_bridge.cloud import EmbeddedCloud

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgewire-cloud-")))
            say("starting Triton Inference Server with the cloud model …")
            c = await stack.enter_async_context(EmbeddedCloud(BrokerSettings(url=url), [arts.cloud_model], workdir))
            assert c.triton is not None
            say(f"cloud: Triton on {c.triton.grpc_url}, bridge {c.bridge_id}")
        monitor = await stack.enter_async_context(MqttSession("demo-monitor", "127.0.0.1", port))
        await monitor.wait_connected(10)
        await monitor.subscribe(topics.LOCAL.filter(), qos=0)

        async def watch() -> None:
            async for msg in monitor.messages():
                for result in env.decode(env.LocalResults, msg.payload).results:
                    board.add(result)

        watcher = asyncio.create_task(watch())
        configs = [
            demo_device_config(
                arts,
                url,
                device_id=f"cam-{k + 1:02d}",
                fps=fps,
                loop=seconds > 0,
                cloud=cloud,
                cloud_deadline_ms=cloud_deadline_ms,
            )
            for k in range(devices)
        ]
        write_standalone_config(arts, out_dir / "device.yaml")
        agents = [EdgeAgent(cfg) for cfg in configs]
        runs = [asyncio.create_task(a.run()) for a in agents]
        say(f"{devices} device(s) playing {len(list(arts.frames_dir.glob('*.jpg')))} frames at {fps:g} fps each")

        async def stopper() -> None:
            if seconds > 0:
                await asyncio.sleep(seconds)
                for a in agents:
                    a.stop()

        stop_task = asyncio.create_task(stopper())
        if quiet or not console.is_terminal:  # a live view only where a terminal redraws it
            summaries = await asyncio.gather(*runs)
        else:
            with Live(board.table("edgewire demo"), console=console, refresh_per_second=4) as live:
                while not all(r.done() for r in runs):
                    await asyncio.wait(runs, timeout=0.25)
                    live.update(board.table(f"edgewire demo · {time.monotonic() - started:.0f} s"))
            summaries = [r.result() for r in runs]
        total = sum(s.completed for s in summaries)
        deadline = time.monotonic() + 5
        while len(board.final) < total and time.monotonic() < deadline:  # noqa: ASYNC110 - QoS 0 stragglers
            await asyncio.sleep(0.05)
        await cancel_and_wait(watcher, stop_task)
    finals = list(board.final.values())
    refs = [r.source_ref for r in finals]
    escalated = [r for r in finals if r.trace_id in board.escalated_ids]
    local = [r for r in finals if r.trace_id not in board.escalated_ids]
    right = [r.prediction is not None and r.prediction.label == str(label_of(Path(r.source_ref))) for r in finals]
    bytes_up = sum(a.meter.total("bytes_escalated_total") for a in agents)
    result = {
        "devices": devices,
        "frames": sum(s.completed for s in summaries),
        "frames_scored": len(finals),
        "escalated": sum(s.escalated for s in summaries),
        "escalation_rate": round(sum(s.escalated for s in summaries) / total, 4) if total else 0.0,
        "timeouts": sum(s.timeouts for s in summaries),
        "accuracy_edge": round(sum(board.edge_answer.values()) / len(board.edge_answer), 4) if board.edge_answer else 0,
        "accuracy_cloud_only": round(cloud_only_accuracy(arts, refs), 4),
        "accuracy_joint": round(sum(right) / len(right), 4) if right else 0.0,
        "p50_ms_local": round(percentile([r.latency_ms for r in local], 50), 2),
        "p99_ms_local": round(percentile([r.latency_ms for r in local], 99), 2),
        "p50_ms_escalated": round(percentile([r.latency_ms for r in escalated], 50), 2),
        "p99_ms_escalated": round(percentile([r.latency_ms for r in escalated], 99), 2),
        "bytes_sent_up": int(bytes_up),
        "mode": "joint" if cloud else "local-only",
        "seconds": round(time.monotonic() - started, 1),
    }
    if not quiet:
        console.print(board.table("edgewire demo · final"))
        console.print(summary_text(result, out_dir / "device.yaml"), highlight=False, soft_wrap=True)
    return result


def summary_text(result: dict[str, Any], device_config: Path) -> str:
    """The closing summary, saying what each figure is, one figure a line (so it reads the same in
    a terminal, a log or a pipe)."""
    return "\n".join(
        [
            f"accuracy of the final answers on {result['frames']} frames, against the true labels:",
            f"  edge only   {result['accuracy_edge']:6.1%}  the device's model alone, on every frame",
            f"  cloud only  {result['accuracy_cloud_only']:6.1%}  the cloud's model alone, had every frame been sent",
            f"  joint       {result['accuracy_joint']:6.1%}  what the devices reported: their own answer, or the "
            "cloud's for the frames they escalated",
            f"escalated {result['escalated']} of {result['frames']} frames ({result['escalation_rate']:.1%}), "
            f"{result['timeouts']} not answered in time (the device's own answer stood), "
            f"{result['bytes_sent_up'] / 1024:.0f} KiB sent up",
            "latency per frame, from capture to final answer (p50 / p99):",
            f"  answered on the device  {result['p50_ms_local']} / {result['p99_ms_local']} ms",
            f"  escalated to the cloud  {result['p50_ms_escalated']} / {result['p99_ms_escalated']} ms",
            f"one device on its own: start a broker (`edgewire broker --allow-anonymous`), optionally the cloud "
            f"(`edgewire cloud --data {device_config.parent}`), then "
            f"`edgewire edge run --config {device_config} --print`",
        ]
    )
