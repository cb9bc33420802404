"""A device with `broker: auto` finds the broker by mDNS, is listed by `edgewire discover`, and
finds the broker again when it moves. Everything runs inside a private network namespace, so
no multicast leaves the machine."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from edgewire.demo.models import DemoArtifacts

from .conftest import NETNS_SETUP, netns_available

SCRIPT = """
import asyncio, json, subprocess, sys, time
import aiomqtt
from edgewire import envelopes as env

PY = sys.executable
CONFIG, P1, P2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def broker(port):
    return subprocess.Popen([PY, "-m", "edgewire.cli", "broker", "--allow-anonymous", "--port", str(port), "--mdns"],
                            stderr=subprocess.DEVNULL)

async def presence(port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier="watcher") as c:
                await c.subscribe("presence/cam-d", qos=1)
                async for m in c.messages:
                    p = env.decode(env.Presence, m.payload)
                    if p.online:
                        return True
                    break
        except aiomqtt.MqttError:
            pass
        await asyncio.sleep(0.3)
    return False

async def main():
    out = {}
    a = broker(P1)
    device = subprocess.Popen([PY, "-m", "edgewire.cli", "edge", "run", "--config", CONFIG],
                              stderr=subprocess.DEVNULL)
    try:
        out["online_at_first_broker"] = await presence(P1, 30)
        listing = subprocess.run([PY, "-m", "edgewire.cli", "discover", "-i", "127.0.0.1", "--timeout", "3",
                                  "--json"], capture_output=True, text=True)
        out["discover"] = json.loads(listing.stdout)
        a.terminate(); a.wait(10)
        b = broker(P2)
        try:
            out["online_at_moved_broker"] = await presence(P2, 40)
        finally:
            b.terminate(); b.wait(10)
    finally:
        device.terminate(); device.wait(10)
        if a.poll() is None:
            a.kill()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.skipif(not netns_available(), reason="needs unshare -n (root) and iproute2")
def test_auto_broker_discovery_listing_and_move(demo: DemoArtifacts, tmp_path: Path) -> None:
    config = {
        "device_id": "cam-d",
        "broker": {
            "url": "auto",
            "mdns_interfaces": ["127.0.0.1"],
            "mdns_timeout_s": 1.5,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
            "startup_wait_s": 20,
        },
        "source": {"kind": "mqtt"},
        "model": {"path": str(demo.edge_model)},
        "advertise": {"address": "127.0.0.1"},
    }
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(config))
    script = tmp_path / "scenario.py"
    script.write_text(textwrap.dedent(SCRIPT))
    args = " ".join(shlex.quote(a) for a in (sys.executable, str(script), str(path), "18831", "18832"))
    out = subprocess.run(
        ["unshare", "-n", "sh", "-c", f"{NETNS_SETUP}; exec {args}"], capture_output=True, text=True, timeout=150
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["online_at_first_broker"] is True
    brokers = result["discover"]["brokers"]
    devices = result["discover"]["devices"]
    assert [(b["host"], b["port"]) for b in brokers] == [("127.0.0.1", 18831)]
    assert [d["name"] for d in devices] == ["cam-d"]
    assert devices[0]["txt"]["models"] == "digits-edge=1.0.0" and devices[0]["txt"]["state"] == "local-only"
    assert result["online_at_moved_broker"] is True


async def test_configured_broker_is_preferred_when_it_answers() -> None:
    from edgewire.broker.embedded import EmbeddedBroker
    from edgewire.config import BrokerSettings
    from edgewire.discovery import find_broker
    from edgewire.errors import DiscoveryError
    from edgewire.ports import free_port

    port = free_port()
    # An interface that does not exist: any mDNS query would fail loudly.
    settings = BrokerSettings(url=f"mqtt://127.0.0.1:{port}", discover=True, mdns_interfaces=["192.0.2.1"])
    async with EmbeddedBroker("127.0.0.1", port, allow_anonymous=True):
        assert await find_broker(settings) == ("127.0.0.1", port)
    with pytest.raises(DiscoveryError):
        await find_broker(settings)  # configured one gone: now it must ask mDNS, which cannot run here
