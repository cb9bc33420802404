"""``edgewire monitor`` in a real terminal (tmux) over a running fleet: a broker (Mosquitto), the
cloud (real Triton and the bridge), the distributor and three device processes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytriton")

from edgewire import signing
from edgewire.cloud_bridge.distributor import Distributor
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.config import (
    BrokerSettings,
    CloudSettings,
    DeliverySettings,
    DeviceConfig,
    JudgeSettings,
    ModelSettings,
    PublishSettings,
    SourceSettings,
)
from edgewire.delivery import build_manifest
from edgewire.demo.models import DemoArtifacts
from edgewire.envelopes import Targets
from edgewire.fleet.push import push
from edgewire.session import MqttSession

from .conftest import BrokerHandle, Mosquitto
from .test_bridge_e2e import RunningBridge
from .test_edge_integration import spawn_edge_run
from .test_model_delivery import variant

KEEPALIVE_S = 5  # the broker publishes a dead client's will after 1.5 keepalives
WILL_DELAY_S = 1.5 * KEEPALIVE_S
REFRESH_S = 0.3
pytestmark = pytest.mark.slow


class Terminal:
    """One tmux session on a private server: the command runs in a real terminal, 250 wide."""

    def __init__(self, name: str, command: list[str]) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed (apt-get install -y tmux)")
        self.socket = f"edgewire-test-{name}"
        # The terminal's own size, not one a test runner exported (pytest sets COLUMNS).
        shell = "env -u COLUMNS -u LINES " + " ".join(command)
        self._tmux("new-session", "-d", "-s", "t", "-x", "250", "-y", "40", shell)
        self._tmux("set-option", "-t", "t", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def line_of(screen: str, client: str) -> str | None:
    return next((line for line in screen.splitlines() if line.split()[:1] == [client]), None)


def cells_of(screen: str, client: str) -> list[str]:
    """A row's cells: columns are two spaces or more apart, a cell's words one."""
    return re.split(r"\s{2,}", (line_of(screen, client) or "").strip())


async def screen_until(term: Terminal, ok: object, timeout: float) -> tuple[str, float]:
    """The first screen ``ok`` accepts, and when it was read."""
    deadline = time.monotonic() + timeout
    while True:
        text = await asyncio.to_thread(term.screen)
        if ok(text):  # type: ignore[operator]
            return text, time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"screen never matched; last screen:\n{text}")
        await asyncio.sleep(0.1)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    m = Mosquitto(tmp_path)
    m.start()
    yield BrokerHandle("mosquitto", "127.0.0.1", m.port)
    m.stop()


def device(demo: DemoArtifacts, url: str, device_id: str, root: Path, public: Path) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id,
        fleet="lab",
        broker=BrokerSettings(url=url, keepalive=KEEPALIVE_S, reconnect_min_s=0.1, reconnect_max_s=1),
        source=SourceSettings(kind="folder", path=demo.frames_dir, loop=True, fps=8),
        model=ModelSettings(path=root / "v1.onnx"),
        judge=JudgeSettings(min_confidence=0.8),
        cloud=CloudSettings(deadline_ms=5000, model_hint="digits"),
        publish=PublishSettings(telemetry_interval_s=1.0),
        delivery=DeliverySettings(store=root / "stores" / device_id, public_key=public, fetch_after_s=0.5),
    )


async def test_monitor_shows_the_fleet_a_dead_device_and_a_rollout(
    broker: BrokerHandle, triton: EmbeddedTriton, demo: DemoArtifacts, tmp_path: Path
) -> None:
    pem, public = signing.generate()
    public_file = tmp_path / "fleet.pub"
    public_file.write_text(public)
    variant(demo.edge_model, tmp_path / "v1.onnx", "1.0.0")  # what the devices start with
    name = "digits-edge"
    dist = Distributor(BrokerSettings(url=broker.url, reconnect_min_s=0.05), tmp_path / "distributor")
    dist_task = asyncio.create_task(dist.run())
    procs: dict[str, asyncio.subprocess.Process] = {}
    term: Terminal | None = None
    try:
        await asyncio.wait_for(dist.ready.wait(), 15)
        async with RunningBridge(broker, triton, bridge_id="bridge-mon"):
            for i in (1, 2, 3):
                folder = tmp_path / f"cam-{i}"
                folder.mkdir()
                cfg = device(demo, broker.url, f"cam-{i}", tmp_path, public_file)
                procs[f"cam-{i}"] = await spawn_edge_run(cfg, folder, output=asyncio.subprocess.DEVNULL)
            term = Terminal(
                str(broker.port),
                [sys.executable, "-m", "edgewire.cli", "monitor", "--broker", broker.url, "--refresh", str(REFRESH_S)],
            )

            def fleet_up(text: str) -> bool:
                rows = [cells_of(text, f"cam-{i}") for i in (1, 2, 3)]
                return all(
                    len(r) == 16 and r[2] == "online" and r[4] == f"{name}@1.0.0" and r[6] != "-" for r in rows
                ) and all(line_of(text, c) is not None for c in ("bridge-mon", dist.client_id))

            screen, _ = await screen_until(term, fleet_up, 90)
            assert "fleet: 3 devices, 3 online, 0 degraded, 0 offline" in screen

            # SIGKILL: no goodbye, only the will the broker publishes after 1.5 keepalives.
            procs["cam-3"].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await procs["cam-3"].wait()
            screen, seen = await screen_until(term, lambda t: cells_of(t, "cam-3")[2].startswith("offline"), 30)
            offline_after = seen - killed
            print(f"cam-3 shown offline {offline_after:.1f} s after SIGKILL (will delay {WILL_DELAY_S:.1f} s)")
            assert offline_after <= WILL_DELAY_S + 2 * REFRESH_S + 2.0  # + redraws and a loaded machine
            assert "3 devices, 2 online, 0 degraded, 1 offline" in screen

            # A new version for cam-1 only: its rollout step, then its model, appear on the screen.
            v2 = variant(demo.edge_model, tmp_path / "v2.onnx", "2.0.0")
            manifest = build_manifest(
                v2, name=name, version="2.0.0", chunk_size=4096, targets=Targets(devices=["cam-1"]),
                private_key=signing.load_private(pem),
            )  # fmt: skip
            steps: set[str] = set()

            def rolled_out(text: str) -> bool:
                cells = cells_of(text, "cam-1")
                if len(cells) == 16 and cells[5].startswith(f"{name}@2.0.0 "):
                    steps.add(cells[5].split(" ", 1)[1])
                return len(cells) == 16 and cells[5] == f"{name}@2.0.0 active" and cells[4] == f"{name}@2.0.0"

            async with MqttSession("operator-mon", broker.host, broker.port) as op:
                await op.wait_connected(10)
                await push(op, v2, manifest)
            screen, _ = await screen_until(term, rolled_out, 60)
            assert "active" in steps
            assert cells_of(screen, "cam-2")[4:6] == [f"{name}@1.0.0", "-"]

            # --json --once carries what the screen shows.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgewire.cli", "monitor", "--broker", broker.url, "--once", "--json",
                "--settle", "2.5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
            screen = await asyncio.to_thread(term.screen)
            assert proc.returncode == 0, stderr.decode()
            docs = [json.loads(line) for line in stdout.decode().splitlines()]
            rows = {d["row"]["client_id"]: d["row"] for d in docs if "row" in d}
            (final,) = [d["summary"] for d in docs if "summary" in d]
            assert (final["devices"], final["online"], final["offline"]) == (3, 2, 1)
            for cid in ("cam-1", "cam-2", "cam-3"):
                cells, row = cells_of(screen, cid), rows[cid]
                assert [cells[1], cells[2].split()[0], cells[3]] == [row["kind"], row["state"], row["fleet"]]
                assert cells[4] == " ".join(f"{n}@{v}" for n, v in sorted(row["models"].items()))
            for cid in ("cam-1", "cam-2"):
                cells, row = cells_of(screen, cid), rows[cid]
                # Both read the same telemetry stream, a report or two apart.
                assert row["fps"] is not None and float(cells[6]) == pytest.approx(row["fps"], abs=3.0)
                assert row["outbox"] is not None and row["drops"] is not None and row["errors"] is not None
                assert row["cpu_percent"] is not None and row["memory_percent"] is not None
                assert "-" not in (cells[13], cells[14])
                assert float(cells[14]) == pytest.approx(row["memory_percent"], abs=5.0)
            assert rows["cam-1"]["rollout"] == {name: "2.0.0 active"}
            assert {"bridge-mon", dist.client_id} <= set(rows)
            print(screen)  # what an operator sees (pytest -s shows it)
    finally:
        if term is not None:
            term.close()
        for p in procs.values():
            if p.returncode is None:
                p.terminate()
                try:
                    await asyncio.wait_for(p.wait(), 20)
                except asyncio.TimeoutError:
                    p.kill()
                    await p.wait()
        dist.stop()
        await asyncio.wait_for(dist_task, 15)
