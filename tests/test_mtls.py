"""Mutual TLS on both brokers, each started from the files `edgewire flash` renders (a fleet CA,
a certificate per user, the revocation list, Mosquitto's mTLS listener): a device connects with
its own certificate and no password; a certificate from another CA, none at all, or one
replaced by a reissue is refused; a device's certificate does not take another's client id;
and a device still reads only its own results (the certificate's CN is its ACL name)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import yaml
from cryptography import x509

from edgewire.broker.embedded import BrokerAuth, BrokerError, BrokerTls, EmbeddedBroker
from edgewire.config import BrokerSettings, DeviceConfig
from edgewire.fleet import flash
from edgewire.fleet.ca import FleetCA
from edgewire.ports import free_port
from edgewire.session import MqttSession
from edgewire.tls import client_context

from .conftest import Mosquitto, MosquittoFiles

FLEET = """
fleet: lab
broker: {url: "mqtts://127.0.0.1:8883"}
client_certificates: {ca_dir: fleet-ca}
broker_users:
  bridge-1: {role: bridge}
  operator: {role: operator}
defaults: {source: {kind: mqtt}, model: {path: /m.onnx}}
devices:
  - {id: cam-a}
  - {id: cam-b}
"""


def flash_fleet(tmp_path: Path, reissue: str | None = None) -> list[flash.Change]:
    """Render and write the devices' and the broker's files, as `edgewire flash` does."""
    fleet_file = tmp_path / "fleet.yaml"
    ca = flash.load_ca(fleet_file)
    devices = flash.render(fleet_file, ca=ca, reissue=reissue)
    broker = flash.render_broker(fleet_file, ca=ca, reissue=reissue)
    changes = list(flash.plan(devices, tmp_path / "out"))
    changes += flash.plan([broker], tmp_path / "broker", per_device_dirs=False)
    changes += flash.plan(flash.ca_files(ca), tmp_path)
    flash.write(changes)
    return changes


@dataclass
class Login:
    ca: Path
    cert: Path
    key: Path

    def context(self):  # type: ignore[no-untyped-def]
        return client_context(self.ca, self.cert, self.key)


@dataclass
class MtlsFleet:
    kind: str
    port: int
    root: Path
    retired_cam_b: Login  # cam-b's certificate before it was reissued

    def device(self, device_id: str) -> Login:
        etc = self.root / "out" / device_id / "etc" / "edgewire"
        return Login(etc / "broker-ca.pem", etc / "client.pem", etc / "client.key")

    def user(self, name: str) -> Login:
        creds = self.root / "broker" / "credentials"
        return Login(self.root / "broker" / "ca.pem", creds / f"{name}.pem", creds / f"{name}.key")

    def client(self, login: Login, client_id: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=client_id,
            tls_context=login.context(),
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            timeout=5,
        )


def mosquitto_listener_lines(rendered: str, install: Path) -> str:
    """The rendered mTLS listener, for the test broker's own listener line and file paths."""
    text = rendered.replace(flash.BROKER_INSTALL_DIR, str(install))
    return "\n".join(line for line in text.splitlines() if line and not re.match(r"#|listener ", line))


@pytest.fixture(params=["amqtt", "mosquitto"])
async def mtls(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MtlsFleet]:
    (tmp_path / "fleet.yaml").write_text(FLEET)
    flash_fleet(tmp_path)
    old = tmp_path / "retired"
    old.mkdir()
    etc = tmp_path / "out" / "cam-b" / "etc" / "edgewire"
    for name in ("client.pem", "client.key"):
        (old / name).write_bytes((etc / name).read_bytes())
    flash_fleet(tmp_path, reissue="cam-b")  # cam-b's certificate rotated: the old one is revoked
    retired = Login(etc / "broker-ca.pem", old / "client.pem", old / "client.key")
    out = tmp_path / "broker"
    if request.param == "amqtt":
        port = free_port()
        tls = BrokerTls(out / "server.pem", out / "server.key", out / "ca.pem", out / "crl.pem", True)
        async with EmbeddedBroker("127.0.0.1", port, auth=BrokerAuth(None, out / "roles.yaml"), tls=tls):
            yield MtlsFleet("amqtt", port, tmp_path, retired)
    else:
        lines = mosquitto_listener_lines((out / flash.BROKER_MTLS_CONF).read_text(), out)
        m = Mosquitto(tmp_path, files=MosquittoFiles(out / "passwd", out / "acl", tls=lines))
        await asyncio.to_thread(m.start)
        try:
            yield MtlsFleet("mosquitto", m.port, tmp_path, retired)
        finally:
            await asyncio.to_thread(m.stop)


async def refused(client: aiomqtt.Client) -> str | None:
    """Why the broker refused this client, or None if it let it in (and kept it a moment)."""
    try:
        async with client:
            await client.subscribe("presence/x", qos=1)  # a refusal after the handshake shows here
            return None
    except aiomqtt.MqttError as exc:
        return str(exc) or type(exc).__name__


async def next_message(client: aiomqtt.Client, timeout: float) -> aiomqtt.Message | None:
    with contextlib.suppress(asyncio.TimeoutError):
        return await asyncio.wait_for(anext(aiter(client.messages)), timeout)
    return None


def test_flash_issues_a_fleet_ca_and_a_certificate_per_user(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET)
    changes = flash_fleet(tmp_path)
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "fleet-ca" / "ca.pem").read_bytes())
    for device_id in ("cam-a", "cam-b"):
        etc = tmp_path / "out" / device_id / "etc" / "edgewire"
        cert = x509.load_pem_x509_certificate((etc / "client.pem").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN={device_id}"
        cert.verify_directly_issued_by(ca_cert)
        assert (etc / "client.key").stat().st_mode & 0o777 == 0o600
        cfg = DeviceConfig.model_validate(yaml.safe_load((etc / "device.yaml").read_text()))
        assert cfg.broker.cert_file == Path("/" + flash.CLIENT_CERT)
        assert cfg.broker.key_file == Path("/" + flash.CLIENT_KEY)
        assert cfg.broker.ca_file == Path("/" + flash.BROKER_CA) and cfg.broker.password is None
        assert (etc / "broker-ca.pem").read_bytes() == (tmp_path / "fleet-ca" / "ca.pem").read_bytes()
    for secret in ("fleet-ca/ca.key", "broker/server.key", "broker/credentials/bridge-1.key"):
        assert (tmp_path / secret).stat().st_mode & 0o777 == 0o600, secret
    # No key is ever shown in a diff (dry run): 2 devices, 2 cloud users and the broker, each in
    # its place and in the CA folder, and the CA. A second flash changes nothing.
    keys = [c for c in changes if c.path.suffix == ".key"]
    assert len(keys) == 11 and all("PRIVATE KEY" not in c.diff() for c in keys)
    assert flash_fleet(tmp_path) == []
    conf = (tmp_path / "broker" / flash.BROKER_MTLS_CONF).read_text()
    for line in ("listener 8883", "require_certificate true", "use_identity_as_username true", "crlfile "):
        assert line in conf
    # A reissue replaces only that user's certificate, and revokes the old one.
    old = x509.load_pem_x509_certificate((tmp_path / "fleet-ca" / "issued" / "cam-b.pem").read_bytes())
    changed = {c.path.relative_to(tmp_path).as_posix() for c in flash_fleet(tmp_path, reissue="cam-b")}
    assert "out/cam-b/etc/edgewire/client.pem" in changed and "out/cam-a/etc/edgewire/client.pem" not in changed
    crl = x509.load_pem_x509_crl((tmp_path / "broker" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None


def test_mutual_tls_needs_an_mqtts_url(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET.replace("mqtts://127.0.0.1:8883", "mqtt://127.0.0.1:1883"))
    with pytest.raises(flash.ConfigError, match="mqtts"):
        flash.render(tmp_path / "fleet.yaml")


async def test_a_device_connects_with_its_own_certificate(mtls: MtlsFleet) -> None:
    etc = mtls.root / "out" / "cam-a" / "etc" / "edgewire"
    rendered = yaml.safe_load((etc / "device.yaml").read_text())["broker"]
    settings = BrokerSettings.model_validate(
        {
            **rendered,
            "url": f"mqtts://127.0.0.1:{mtls.port}",
            **{k: str(etc / Path(rendered[k]).name) for k in ("ca_file", "cert_file", "key_file")},
        }
    )
    async with (
        MqttSession.from_settings("cam-a", settings) as device,
        mtls.client(mtls.user("bridge-1"), "bridge-1") as bridge,
    ):
        await device.wait_connected(10)
        await device.subscribe("result/cam-a", qos=1)
        await asyncio.sleep(0.2)
        await bridge.publish("result/cam-a", b"answer", qos=1)
        got = await asyncio.wait_for(anext(aiter(device.messages())), 10)
        assert bytes(got.payload) == b"answer"
    assert await refused(mtls.client(mtls.device("cam-b"), "cam-b")) is None  # the reissued one


async def test_untrusted_missing_or_revoked_certificates_are_refused(mtls: MtlsFleet, tmp_path: Path) -> None:
    other = FleetCA(tmp_path / "other-ca", fleet="elsewhere", days=90)
    cert, key = other.client("cam-a")
    (tmp_path / "o.pem").write_bytes(cert)
    (tmp_path / "o.key").write_bytes(key)
    forged = Login(mtls.device("cam-a").ca, tmp_path / "o.pem", tmp_path / "o.key")
    assert await refused(mtls.client(forged, "cam-a")) is not None
    no_certificate = aiomqtt.Client(
        "127.0.0.1",
        mtls.port,
        identifier="cam-a",
        tls_context=client_context(mtls.device("cam-a").ca),
        protocol=aiomqtt.ProtocolVersion.V311,
        timeout=5,
    )
    assert await refused(no_certificate) is not None
    assert await refused(mtls.client(mtls.retired_cam_b, "cam-b")) is not None
    assert await refused(mtls.client(mtls.device("cam-a"), "cam-a")) is None


async def test_a_certificate_does_not_take_another_client_id(mtls: MtlsFleet) -> None:
    async with (
        mtls.client(mtls.device("cam-a"), "cam-a") as a,
        mtls.client(mtls.user("operator"), "operator") as op,
    ):
        await a.subscribe("config/desired/cam-a", qos=1)
        thief = mtls.client(mtls.device("cam-b"), "cam-a")
        if mtls.kind == "amqtt":
            assert await refused(thief) is not None
        else:  # Mosquitto makes the certificate's CN the client id: the thief is cam-b
            async with thief:
                await asyncio.sleep(0.3)
        await asyncio.sleep(0.3)
        await op.publish("config/desired/cam-a", b"still here?", qos=1)
        got = await next_message(a, 5)  # raises MqttError if cam-a was knocked off
        assert got is not None and got.payload == b"still here?"


async def test_a_device_reads_only_its_own_results(mtls: MtlsFleet) -> None:
    async with (
        mtls.client(mtls.device("cam-a"), "cam-a") as a,
        mtls.client(mtls.device("cam-b"), "cam-b") as b,
        mtls.client(mtls.user("bridge-1"), "bridge-1") as bridge,
    ):
        await a.subscribe("result/cam-a", qos=1)
        for theirs in ("result/cam-a", "result/+", "#"):
            granted = await b.subscribe(theirs, qos=1)
            if mtls.kind == "amqtt":  # refused outright; Mosquitto grants it and delivers nothing of it
                assert [int(getattr(g, "value", g)) for g in granted] == [0x80], (theirs, granted)
        with contextlib.suppress(aiomqtt.MqttError):
            await b.publish("result/cam-a", b"forged", qos=1)  # a device publishes no results
        await bridge.publish("result/cam-a", b"answer", qos=1)
        got = await next_message(a, 5)
        assert got is not None and got.payload == b"answer"
        assert await next_message(a, 0.5) is None  # not the forged one
        assert await next_message(b, 1.0) is None


def test_the_broker_command_checks_its_tls_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgewire.cli.app import app

    runner = CliRunner()
    half = runner.invoke(app, ["broker", "--certfile", str(tmp_path / "s.pem")])
    assert half.exit_code != 0 and "--keyfile" in half.output
    no_server = runner.invoke(app, ["broker", "--require-certificate", "--cafile", str(tmp_path / "ca.pem")])
    assert no_server.exit_code != 0 and "--certfile" in no_server.output
    with pytest.raises(BrokerError, match="require_certificate"):
        EmbeddedBroker(auth=BrokerAuth(None, None), tls=BrokerTls(tmp_path / "s.pem", tmp_path / "s.key"))
