"""Discovery across hosts: a broker and devices each in their own network namespace, joined by
veth pairs to a bridge in a switch namespace. Multicast crosses the switch like a real LAN and
never touches the machine's own interfaces. Needs root and iproute2; skipped otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgewire.demo.models import DemoArtifacts

HOSTS = {"broker": "10.77.0.1", "broker2": "10.77.0.2", "dev1": "10.77.0.11", "dev2": "10.77.0.12"}


def listen(host: str) -> list[str]:
    return ["--host", host, "--port", "1883", "--mdns"]


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True)


def _can_make_namespaces() -> bool:
    if not shutil.which("ip") or os.geteuid() != 0:
        return False
    name = f"ew-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


class Lan:
    """A switch namespace with a bridge, and one namespace per host plugged into it."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}"
        self.switch = f"ew-sw-{tag}"
        self.ns = {host: f"ew-{host}-{tag}" for host in HOSTS}
        self.procs: list[subprocess.Popen[bytes]] = []

    def up(self) -> None:
        subprocess.run(["ip", "netns", "add", self.switch], check=True)
        _ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, (host, addr) in enumerate(HOSTS.items()):
            ns = self.ns[host]
            subprocess.run(["ip", "netns", "add", ns], check=True)
            # Both ends are created inside namespaces: nothing appears on the host.
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.switch, ns=ns)
            _ip("link", "set", f"p{i}", "master", "br0", "up", ns=self.switch)
            _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("route", "add", "224.0.0.0/4", "dev", "eth0", ns=ns)

    def run(self, host: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[host], sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for ns in [*self.ns.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


CHECK = """
import asyncio, json, sys, time
import aiomqtt
from edgewire import envelopes as env, topics
host, device, frame = sys.argv[1], sys.argv[2], sys.argv[3]
async def main():
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            async with aiomqtt.Client(host, 1883, identifier="checker") as c:
                await c.subscribe(f"presence/{device}", qos=1)
                await c.subscribe(f"local/{device}", qos=0)
                online = False
                async for m in c.messages:
                    if str(m.topic).startswith("presence/") and env.decode(env.Presence, m.payload).online:
                        online = True
                        data = open(frame, "rb").read()
                        f = env.Frame(frame_id="probe.jpg", ts=time.time(), content_type="image/jpeg", data=data)
                        await c.publish(f"input/{device}", env.encode(f), qos=1)
                    elif str(m.topic).startswith("local/") and online:
                        r = env.decode(env.LocalResults, m.payload).results[0]
                        print(json.dumps({"online": True, "answered": r.source_ref}))
                        return
        except aiomqtt.MqttError:
            await asyncio.sleep(0.5)
    print(json.dumps({"online": False}))
asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2 (ip netns)")
def test_devices_find_the_broker_and_each_other_across_namespaces(demo: DemoArtifacts, tmp_path: Path) -> None:
    lan = Lan()
    frame = str(sorted(demo.frames_dir.glob("*.jpg"))[0])
    check = tmp_path / "check.py"
    check.write_text(CHECK)
    try:
        lan.up()
        lan.run("broker", "-m", "edgewire.cli", "broker", "--allow-anonymous", *listen(HOSTS["broker"]))
        for k, host in enumerate(("dev1", "dev2"), start=1):
            cfg = {
                "device_id": f"cam-{k}",
                "broker": {
                    "url": "auto",
                    "mdns_interfaces": [HOSTS[host]],
                    "mdns_timeout_s": 2,
                    "reconnect_min_s": 0.2,
                    "reconnect_max_s": 1.0,
                    "startup_wait_s": 30,
                },
                "source": {"kind": "mqtt"},
                "model": {"path": str(demo.edge_model)},
                "advertise": {"address": HOSTS[host]},
            }
            path = tmp_path / f"cam-{k}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            lan.run(host, "-m", "edgewire.cli", "edge", "run", "--config", str(path))
        # End to end: cam-1 (in its own namespace) found the broker, answers a frame sent to it.
        first = lan.run("broker", str(check), HOSTS["broker"], "cam-1", frame)
        out, _ = first.communicate(timeout=60)
        assert json.loads(out.decode().strip().splitlines()[-1]) == {"online": True, "answered": "probe.jpg"}
        # Devices see the broker and each other from where they stand.
        time.sleep(1.0)
        listing = lan.run("dev2", "-m", "edgewire.cli", "discover", "-i", HOSTS["dev2"], "--timeout", "3", "--json")
        doc = json.loads(listing.communicate(timeout=30)[0].decode().strip().splitlines()[-1])
        assert [(b["host"], b["port"]) for b in doc["brokers"]] == [(HOSTS["broker"], 1883)]
        assert {(d["name"], d["host"]) for d in doc["devices"]} == {("cam-1", HOSTS["dev1"]), ("cam-2", HOSTS["dev2"])}
        # The broker moves to another host: the device finds it again there.
        lan.procs[0].terminate()
        lan.procs[0].wait(10)
        lan.run("broker2", "-m", "edgewire.cli", "broker", "--allow-anonymous", *listen(HOSTS["broker2"]))
        moved = lan.run("broker2", str(check), HOSTS["broker2"], "cam-1", frame)
        out, _ = moved.communicate(timeout=60)
        assert json.loads(out.decode().strip().splitlines()[-1]) == {"online": True, "answered": "probe.jpg"}
    finally:
        lan.down()
