"""Sites: two site Mosquitto brokers, rendered by flash, bridged to a central one.

Real processes on loopback ports. Each site's uplink runs through a TCP relay the test can cut,
so an uplink drop is a real dropped connection for the site broker's bridge, while the devices
keep their own connections to their site broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from edgewire.cloud_bridge.breaker import BreakerBoard
from edgewire.cloud_bridge.bridge import Bridge
from edgewire.cloud_bridge.dispatch import Dispatcher
from edgewire.cloud_bridge.rules import default_rules
from edgewire.cloud_bridge.triton_server import EmbeddedTriton
from edgewire.config import BrokerSettings, DeviceConfig
from edgewire.demo.models import DemoArtifacts
from edgewire.fleet import flash, sites
from edgewire.fleet.sim import load_frames
from edgewire.fleet.sim_device import Identity, SimDevice, SimSettings
from edgewire.ports import free_port, wait_port
from edgewire.session import MqttSession

from .conftest import Mosquitto, stop_process, until


class Relay:
    """A TCP relay from a local port to a target; :meth:`cut` drops every connection through it
    and refuses new ones until :meth:`restore`."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()


def site_broker(files: dict[str, bytes], workdir: Path, name: str, uplink_port: int) -> subprocess.Popen[bytes]:
    """Start Mosquitto from a rendered site configuration and ACL, their paths moved into
    ``workdir`` and the uplink pointed at the test's relay."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    state = workdir / name
    state.mkdir()
    (state / Path(sites.SITE_ACL).name).write_bytes(files[sites.SITE_ACL])
    conf = (
        files[sites.SITE_CONF]
        .decode()
        .replace("/var/lib/mosquitto/", f"{state}/")
        .replace("/etc/mosquitto/", f"{state}/")
    )
    conf = re.sub(r"^address .*$", f"address 127.0.0.1:{uplink_port}", conf, flags=re.M)
    # Started as root, Mosquitto drops to its own user before reading the ACL: keep the test's
    # user, which owns the private temporary folder (no effect when not root).
    conf = f"user {getpass.getuser()}\n{conf}"
    path = state / "mosquitto.conf"
    path.write_text(conf)
    return subprocess.Popen([exe, "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def write_fleet(path: Path, port_a: int, port_b: int) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "fleet": "plants",
                "broker": {"url": "mqtt://127.0.0.1:1883"},
                "central": {"url": "mqtt://central.example:1883"},
                "sites": [
                    {"name": "a", "url": f"mqtt://127.0.0.1:{port_a}", "devices": ["cam-a*"]},
                    {"name": "b", "url": f"mqtt://127.0.0.1:{port_b}", "devices": ["cam-b*"]},
                ],
                "defaults": {"source": {"kind": "mqtt"}, "model": {"path": "/opt/m.onnx"}},
                "devices": [{"id": "cam-a1"}, {"id": "cam-a2"}, {"id": "cam-b1"}, {"id": "cam-b2"}],
            }
        )
    )


def test_flash_renders_each_site_broker_and_points_devices_at_it(tmp_path: Path) -> None:
    write_fleet(tmp_path / "fleet.yaml", 21883, 22883)
    rendered = {r.device_id: r.files for r in flash.render(tmp_path / "fleet.yaml")}
    device = DeviceConfig.model_validate(yaml.safe_load(rendered["cam-a1"][flash.DEVICE_CONFIG]))
    assert device.broker.url == "mqtt://127.0.0.1:21883"  # the site broker, never the central one
    conf_a = rendered["site-a"][sites.SITE_CONF].decode()
    assert "address central.example:1883" in conf_a and "cleansession false" in conf_a
    assert "topic result/cam-a1 in 1" in conf_a and "topic result/cam-a2 in 1" in conf_a
    assert "cam-b" not in conf_a  # another site's answers never come down this uplink
    for up in ("req/#", "presence/#", "model/status/#"):
        assert f"topic {up} out 1" in conf_a
    for down in ("model/announce/#", "model/chunk/#", "config/fleet/#"):
        assert f"topic {down} in 1" in conf_a
    central_acl = rendered["central"][sites.CENTRAL_ACL].decode()
    site_b_block = central_acl.split("user site-b", 1)[1]
    assert "topic read result/cam-b1" in site_b_block and "cam-a" not in site_b_block


def test_flash_renders_a_site_tier_bridge_whose_uplink_carries_only_what_it_hands_up(tmp_path: Path) -> None:
    from edgewire.cloud_bridge.rules import load_rules
    from edgewire.passwords import verify_password

    write_fleet(tmp_path / "fleet.yaml", 21883, 22883)
    doc = yaml.safe_load((tmp_path / "fleet.yaml").read_text())
    doc["credentials_secret"] = "s3cret"
    doc["sites"][0]["tier"] = {"triton": "grpc://10.0.0.5:8001", "model": "digits-site", "min_confidence": 0.7}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    rendered = {r.device_id: r.files for r in flash.render(tmp_path / "fleet.yaml")}
    site_a, site_b = rendered["site-a"], rendered["site-b"]
    conf_a = site_a[sites.SITE_CONF].decode()
    # Requests go up and answers come down only under the prefix: the site bridge's, never the devices'.
    assert 'topic req/# out 1 cloud/ ""' in conf_a and "topic req/# out 1\n" not in conf_a
    assert 'topic result/cam-a1 in 1 cloud/ ""' in conf_a and "topic result/cam-a1 in 1\n" not in conf_a
    assert "topic config/desired/cam-a1 in 1\n" in conf_a and "topic presence/# out 1\n" in conf_a
    assert "topic req/# out 1\n" in site_b[sites.SITE_CONF].decode()  # a site without a tier: as before
    assert sites.SITE_BRIDGE_RULES not in site_b
    rules_path = tmp_path / "site-rules.yaml"
    rules_path.write_bytes(site_a[sites.SITE_BRIDGE_RULES])
    rules = load_rules(rules_path)
    assert rules.upstream is not None and rules.upstream.prefix == sites.UPLINK_PREFIX
    route = rules.default
    assert route is not None and route.route_to == ["digits-site", "tier:cloud"] and route.min_confidence == 0.7
    env_text = site_a[sites.SITE_BRIDGE_ENV].decode()
    assert "EDGEWIRE_BROKER=mqtt://site-a-bridge@127.0.0.1:21883" in env_text
    assert (
        "EDGEWIRE_TRITON=grpc://10.0.0.5:8001" in env_text
        and "EDGEWIRE_RULES=/etc/edgewire/site-rules.yaml" in env_text
    )
    password = site_a[f"{sites.SITE_BRIDGE_CREDENTIALS}/site-a-bridge"].decode().strip()
    assert f"EDGEWIRE_MQTT_PASSWORD_FILE=/{sites.SITE_BRIDGE_CREDENTIALS}/site-a-bridge" in env_text
    assert "--id site-a-bridge" in site_a[sites.SITE_BRIDGE_UNIT].decode()
    logins = dict(line.split(":", 1) for line in site_a[sites.SITE_PASSWD].decode().splitlines())
    assert set(logins) == {"cam-a1", "cam-a2", "site-a-bridge"} and verify_password(password, logins["site-a-bridge"])
    device = DeviceConfig.model_validate(yaml.safe_load(rendered["cam-a1"][flash.DEVICE_CONFIG]))
    assert device.broker.password is not None and verify_password(device.broker.password, logins["cam-a1"])
    acl_a = site_a[sites.SITE_ACL].decode()
    bridge_block = acl_a.split("user site-a-bridge", 1)[1]
    for line in ("topic read req/+/+", "topic write result/+", "topic write cloud/req/#", "topic read cloud/result/+"):
        assert line in bridge_block
    central_acl = rendered["central"][sites.CENTRAL_ACL].decode()
    assert "topic write presence/site-a-bridge" in central_acl.split("user site-a", 1)[1].split("user site-b")[0]
    changes = list(flash.plan(list(flash.render(tmp_path / "fleet.yaml")), tmp_path / "out"))
    secret = {c.path.name for c in changes if c.secret}
    assert {"site-a-bridge", "edgewire-site.passwd", "device.yaml"} <= secret


def test_sites_without_a_central_broker_are_refused(tmp_path: Path) -> None:
    from edgewire.errors import ConfigError

    write_fleet(tmp_path / "fleet.yaml", 21883, 22883)
    doc = yaml.safe_load((tmp_path / "fleet.yaml").read_text())
    del doc["central"]
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="central"):
        flash.render(tmp_path / "fleet.yaml")


@pytest.mark.slow
async def test_two_sites_escalate_through_their_uplinks_and_survive_a_20s_cut(
    tmp_path: Path, triton: EmbeddedTriton, demo: DemoArtifacts
) -> None:
    central = Mosquitto(tmp_path)
    await asyncio.to_thread(central.start)
    relays = {"a": Relay(central.port), "b": Relay(central.port)}
    ports = {"a": free_port(), "b": free_port()}
    write_fleet(tmp_path / "fleet.yaml", ports["a"], ports["b"])
    rendered = {r.device_id: r.files for r in flash.render(tmp_path / "fleet.yaml")}
    procs: list[subprocess.Popen[bytes]] = []
    dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"], breakers=BreakerBoard())
    at_central = BrokerSettings(url=f"mqtt://127.0.0.1:{central.port}", reconnect_min_s=0.1)
    bridge = Bridge("central-bridge", at_central, dispatcher, default_rules("digits-cloud"))
    bridge_task = asyncio.create_task(bridge.run())
    frames = load_frames(demo.frames_dir, limit=16)
    settings = SimSettings(escalations_per_s=4.0, deadline_ms=120_000, telemetry_interval_s=1.0, resend_after_s=30.0)
    devices: dict[str, SimDevice] = {}
    snoop: MqttSession | None = None
    try:
        for name, relay in relays.items():
            await relay.start()
            procs.append(site_broker(rendered[f"site-{name}"], tmp_path, f"site-{name}", relay.port))
            await asyncio.to_thread(wait_port, ports[name])
        await asyncio.wait_for(bridge.ready.wait(), 30)
        for device_id in ("cam-a1", "cam-b1"):
            cfg = DeviceConfig.model_validate(yaml.safe_load(rendered[device_id][flash.DEVICE_CONFIG]))
            # Lab sites take anonymous devices; the username still binds each to its ACL lines.
            identity = Identity(device_id, username=device_id, fleet=cfg.fleet)
            device_settings = SimSettings(**{**settings.__dict__, "host": cfg.broker.host, "port": cfg.broker.port})
            devices[device_id] = SimDevice(identity, device_settings, frames)
        # A device on site b that tries to read everything, other sites' topics included.
        snoop = MqttSession("cam-b2", "127.0.0.1", ports["b"], username="cam-b2", protocol="3.1.1")
        await snoop.__aenter__()
        await snoop.wait_connected(10)
        await snoop.subscribe("#", qos=1)
        await asyncio.sleep(2)  # the uplinks' subscriptions at the central broker
        for device in devices.values():
            await device.start()
        a, b = devices["cam-a1"], devices["cam-b1"]
        assert await until(lambda: a.stats.answered >= 5 and b.stats.answered >= 5, 60), (a.stats, b.stats)

        await relays["a"].cut()
        cut_at = time.monotonic()
        answered_a, answered_b = a.stats.answered, b.stats.answered
        await asyncio.sleep(20)
        # Site a kept its devices (they still reach their site broker) and got nothing back from
        # the cloud; site b went on as before.
        assert a.session.connected and a.session.connects == 1
        assert a.stats.answered <= answered_a + 2  # at most what was on its way down at the cut
        assert len(a.owed) >= 40
        assert b.stats.answered >= answered_b + 40
        await relays["a"].restore()
        left = f"{len(a.owed)} still owed {time.monotonic() - cut_at:.0f} s after the cut"
        assert await until(lambda: not a.owed, 90), left
        for device in devices.values():
            await device.stop_escalating()
        assert await until(lambda: not a.owed and not b.owed, 60)
        made = {d.device_id: d._seq for d in devices.values()}
        for device in devices.values():
            assert device.stats.answered == made[device.device_id]  # lost nothing
            assert device.stats.duplicates == 0
            assert device.stats.statuses == {"ok": made[device.device_id]}
        assert bridge.meter.total("requests_total") == sum(made.values())  # ran nothing twice
        seen = snoop.drain_inbox()
        assert not [m.topic for m in seen if "cam-a" in m.topic]  # site b never saw site a's traffic
        assert not [m.topic for m in seen if m.topic.startswith("result/") and m.topic != "result/cam-b2"]
    finally:
        for device in devices.values():
            await device.close()
        if snoop is not None:
            await snoop.close()
        bridge.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bridge_task, 30)
        await dispatcher.close()
        for relay in relays.values():
            with contextlib.suppress(Exception):
                await relay.cut()
        for proc in procs:
            stop_process(proc, 5)
        await asyncio.to_thread(central.stop)
