"""mDNS advertise/browse round trips, each inside its own network namespace.

mDNS is multicast: run on the host, these tests would announce fake brokers and devices to the
whole LAN. So every test runs its script under ``unshare -n``, where only ``lo`` exists, and the
script talks over 127.0.0.x. The tests skip where namespaces cannot be made (not root, no
``unshare`` or ``ip``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .conftest import NETNS_SETUP

REPO = Path(__file__).resolve().parents[1]

# NETNS_SETUP (conftest): lo needs no MULTICAST flag or multicast route for zeroconf (it sets
# IP_MULTICAST_IF), but having them makes the namespace behave like a real link for anything else.

# Every script starts with this; it prints one JSON object as its last line.
PRELUDE = """
import asyncio, json, subprocess, sys, time
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf
from edgewire.mdns import EDGEWIRE_SERVICE, MQTT_SERVICE, Advertiser, browse

LO = ["127.0.0.1"]

def services(found):
    return {s.name: {"host": s.host, "port": s.port, "properties": s.properties} for s in found}
"""


def _namespaces_work() -> str | None:
    """The reason the tests cannot run here, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare(1) and ip(8)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot create a network namespace (needs root): {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module", autouse=True)
def _private_network() -> None:
    reason = _namespaces_work()
    if reason is not None:
        pytest.skip(reason)


def run_in_netns(script: str, timeout: float = 20.0) -> dict[str, Any]:
    """Run PRELUDE + script in a fresh network namespace and return its JSON line."""
    code = PRELUDE + textwrap.dedent(script)
    command = f"{NETNS_SETUP}; exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, f"script failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_browse_finds_broker_advertised_by_another_process() -> None:
    # The broker lives in a child process, so the records really cross the kernel's lo.
    out = run_in_netns(
        """
        BROKER = '''
        import asyncio, sys
        from edgewire.mdns import MQTT_SERVICE, Advertiser
        async def main():
            async with Advertiser(MQTT_SERVICE, "broker", 18830, addresses=["127.0.0.1"],
                                  properties={"edgewire": "1"}):
                print("ready", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        asyncio.run(main())
        '''
        broker = subprocess.Popen([sys.executable, "-c", BROKER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert broker.stdout.readline().strip() == "ready"
        try:
            found = asyncio.run(browse(MQTT_SERVICE, timeout=1.5, interfaces=LO))
        finally:
            broker.stdin.close()
            broker.wait(timeout=10)
        print(json.dumps({"services": services(found), "rc": broker.returncode,
                          "instances": [s.instance for s in found]}))
        """
    )
    assert out["rc"] == 0
    assert out["instances"] == ["broker"]
    assert out["services"] == {
        "broker._mqtt._tcp.local.": {"host": "127.0.0.1", "port": 18830, "properties": {"edgewire": "1"}}
    }


def test_browse_finds_two_devices_and_sees_txt_update() -> None:
    out = run_in_netns(
        """
        async def main():
            a = Advertiser(EDGEWIRE_SERVICE, "jetson-a", 18841, addresses=["127.0.0.1"],
                           properties={"device_id": "jetson-a", "profile": "orin-nano", "status": "idle"})
            b = Advertiser(EDGEWIRE_SERVICE, "jetson-b", 18842, addresses=["127.0.0.2"],
                           properties={"device_id": "jetson-b", "profile": "agx-orin", "status": "idle"})
            await asyncio.gather(a.__aenter__(), b.__aenter__())  # probing takes ~1 s each
            try:
                before = await browse(EDGEWIRE_SERVICE, timeout=1.5, interfaces=LO)
                await b.update({"device_id": "jetson-b", "profile": "agx-orin", "status": "busy"})
                after = await browse(EDGEWIRE_SERVICE, timeout=1.5, interfaces=LO)
            finally:
                await asyncio.gather(a.__aexit__(None, None, None), b.__aexit__(None, None, None))
            return {"before": services(before), "after": services(after),
                    "order": [s.name for s in before]}
        print(json.dumps(asyncio.run(main())))
        """
    )
    a, b = "jetson-a._edgewire._tcp.local.", "jetson-b._edgewire._tcp.local."
    assert out["order"] == [a, b]
    before, after = out["before"], out["after"]
    assert before[a] == {
        "host": "127.0.0.1",
        "port": 18841,
        "properties": {"device_id": "jetson-a", "profile": "orin-nano", "status": "idle"},
    }
    assert before[b] == {
        "host": "127.0.0.2",
        "port": 18842,
        "properties": {"device_id": "jetson-b", "profile": "agx-orin", "status": "idle"},
    }
    assert after[a] == before[a]
    assert after[b]["properties"]["status"] == "busy"
    assert {k: v for k, v in after[b].items() if k != "properties"} == {"host": "127.0.0.2", "port": 18842}


def test_exit_sends_goodbye_and_fresh_browse_is_empty() -> None:
    out = run_in_netns(
        """
        async def main():
            events = []
            def on_change(zeroconf, service_type, name, state_change):
                events.append((time.monotonic(), state_change.name))
            async with AsyncZeroconf(interfaces=LO, ip_version=IPVersion.V4Only) as watcher:
                browser = AsyncServiceBrowser(watcher.zeroconf, [EDGEWIRE_SERVICE], handlers=[on_change])
                async with Advertiser(EDGEWIRE_SERVICE, "jetson-gone", 18843, addresses=["127.0.0.1"],
                                      properties={"device_id": "jetson-gone"}):
                    for _ in range(30):
                        if any(kind == "Added" for _, kind in events):
                            break
                        await asyncio.sleep(0.1)
                    left = time.monotonic()
                # A goodbye is a TTL-0 record (RFC 6762 §10.1); browsers drop the instance at once.
                for _ in range(30):
                    if any(kind == "Removed" for _, kind in events):
                        break
                    await asyncio.sleep(0.1)
                await browser.async_cancel()
            removed = [t - left for t, kind in events if kind == "Removed"]
            fresh = await browse(EDGEWIRE_SERVICE, timeout=1.5, interfaces=LO)
            return {"kinds": [kind for _, kind in events], "removed_after": removed,
                    "fresh": services(fresh)}
        print(json.dumps(asyncio.run(main())))
        """
    )
    assert out["kinds"][0] == "Added"
    assert "Removed" in out["kinds"]
    # A small part of the 120 s host TTL, so it was the goodbye and not an expiry.
    assert out["removed_after"][0] < 120 / 10
    assert out["fresh"] == {}
