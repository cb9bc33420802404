"""The agent speaks systemd's notify protocol: READY after connecting, then watchdog pings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from edgewire.config import BrokerSettings, DeviceConfig, ModelSettings, SourceSettings
from edgewire.demo.models import DemoArtifacts


def test_ready_after_connect_then_watchdog_pings(mosquitto, demo: DemoArtifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = DeviceConfig(
        device_id="cam-sd",
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{mosquitto.port}"),
        source=SourceSettings(kind="mqtt"),
        model=ModelSettings(path=demo.edge_model),
    )
    config = tmp_path / "device.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgewire.cli", "edge", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 20
        while sum(m == "WATCHDOG=1" for m in messages) < 3 and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        ready = [m for m in messages if m.startswith("READY=1")]
        assert ready and "broker up" in ready[0]
        assert messages.index(ready[0]) < messages.index("WATCHDOG=1")
        assert sum(m == "WATCHDOG=1" for m in messages) >= 3
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()


def test_broker_command_notifies_ready_and_pings(tmp_path: Path) -> None:
    from edgewire.ports import free_port

    port = free_port()
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgewire.cli", "broker", "--allow-anonymous", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1") and f"127.0.0.1:{port}" in first
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # READY came after the listener was bound
        assert [sock.recv(4096).decode() for _ in range(2)] == ["WATCHDOG=1", "WATCHDOG=1"]
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()
