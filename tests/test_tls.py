"""TLS to Mosquitto, on the session's fast path and its plain path: a fleet CA made here with
`cryptography`, a server certificate for 127.0.0.1, a device that round-trips through it, and
a broker signed by another CA refused at the handshake with the reason."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgewire.config import BrokerSettings
from edgewire.errors import EdgewireError
from edgewire.ports import free_port
from edgewire.session import MqttSession

from .conftest import Mosquitto, MosquittoFiles
from .test_identity import rendered_broker_files


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("broker"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


TlsBroker = tuple[Mosquitto, Path, Path, dict[str, str]]


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    ca_key, ca, ca_path = make_ca(tmp_path, "fleet-ca")
    _, _, other_ca_path = make_ca(tmp_path, "someone-else")
    cert, key = make_server_cert(tmp_path, ca_key, ca)
    out, passwords = rendered_broker_files(tmp_path)
    tls = f"cafile {ca_path}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate false"
    m = Mosquitto(tmp_path, free_port(), files=MosquittoFiles(out / "passwd", out / "acl", tls=tls))
    m.start()
    yield m, ca_path, other_ca_path, passwords
    m.stop()


@pytest.mark.parametrize("path", ["fast", "plain"])
async def test_a_device_round_trips_over_tls(tls_broker: TlsBroker, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "plain":
        monkeypatch.setenv("EDGEWIRE_MQTT_FASTPATH", "0")
    else:  # the fast case tests the fast path even where the environment turns it off
        monkeypatch.delenv("EDGEWIRE_MQTT_FASTPATH", raising=False)
    m, ca, _, passwords = tls_broker

    def settings(user: str) -> BrokerSettings:
        return BrokerSettings(url=f"mqtts://127.0.0.1:{m.port}", ca_file=ca, username=user, password=passwords[user])

    big = bytes(range(256)) * 4096  # 1 MiB: many TLS records each way
    async with (
        MqttSession.from_settings("cam-a", settings("cam-a")) as device,
        MqttSession.from_settings("bridge-1", settings("bridge-1")) as bridge,
    ):
        await device.wait_connected(10)
        await bridge.wait_connected(10)
        assert device.url.startswith("mqtts://") and device.fast_path == (path == "fast")
        await bridge.subscribe("req/+/+" if bridge.protocol != "5" else "$share/bridges/req/+/+", qos=1)
        await device.subscribe("result/cam-a", qos=1)
        for i in range(20):
            await device.publish(f"req/cam-a/{i:032x}", big[: 1000 * (i + 1)] if i < 19 else big, qos=1)
        got = [await asyncio.wait_for(anext(aiter(bridge.messages())), 10) for _ in range(20)]
        assert [len(g.payload) for g in got] == [1000 * (i + 1) for i in range(19)] + [len(big)]
        await bridge.publish("result/cam-a", b"answer", qos=1)
        answer = await asyncio.wait_for(anext(aiter(device.messages())), 10)
        assert bytes(answer.payload) == b"answer"


async def test_a_broker_signed_by_another_ca_is_refused(tls_broker: TlsBroker) -> None:
    m, _, other_ca, passwords = tls_broker
    settings = BrokerSettings(
        url=f"mqtts://127.0.0.1:{m.port}", ca_file=other_ca, username="cam-a", password=passwords["cam-a"]
    )
    async with MqttSession.from_settings("cam-a", settings) as device:
        with pytest.raises(EdgewireError) as refused:
            await device.wait_connected(3)
    assert "certificate verify failed" in str(refused.value)
    assert "mqtts://127.0.0.1" in str(refused.value)


def test_tls_settings_are_checked_up_front(tmp_path: Path) -> None:
    assert BrokerSettings(url="mqtts://broker.example").port == 8883
    with pytest.raises(ValueError, match="cert_file and key_file"):
        BrokerSettings(url="mqtts://broker.example", cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="mqtts"):
        BrokerSettings(url="mqtt://broker.example", ca_file=tmp_path / "ca.pem")


def test_flash_renders_the_broker_ca_and_tls_settings(tmp_path: Path) -> None:
    import yaml

    from edgewire.config import DeviceConfig
    from edgewire.fleet import flash

    _, _, ca = make_ca(tmp_path, "fleet-ca")
    fleet = {
        "fleet": "lab",
        "broker": {"url": "mqtts://broker.lab.example"},
        "credentials_secret": "s",
        "broker_ca": ca.read_text(),
        "defaults": {"source": {"kind": "mqtt"}, "model": {"path": "/m.onnx"}},
        "devices": [{"id": "cam-1"}],
    }
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(fleet))
    [device] = flash.render(fleet_file)
    cfg = DeviceConfig.model_validate(yaml.safe_load(device.files[flash.DEVICE_CONFIG]))
    assert cfg.broker.tls and cfg.broker.port == 8883
    assert cfg.broker.ca_file == Path("/" + flash.BROKER_CA)
    assert device.files[flash.BROKER_CA] == ca.read_bytes()
