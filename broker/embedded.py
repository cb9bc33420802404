"""The zero-setup broker: amqtt in-process, bound to one address, optionally on mDNS.

amqtt speaks MQTT 3.1.1 only and has no shared subscriptions; it is the default because it
needs nothing installed. Production fleets run Mosquitto (mosquitto.conf beside this file) or
a clustered broker; edgewire uses only standard MQTT, so nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgewire.errors import EdgewireError
from edgewire.tls import server_context

from .guard import GuardedBroker, read_roles
from .pacing import DevicePacing, ReadBudget

log = logging.getLogger(__name__)


class BrokerError(EdgewireError):
    """The embedded broker could not start."""


@dataclass(frozen=True)
class BrokerAuth:
    """The fleet's users as ``edgewire flash`` renders them: Mosquitto's password file (the same
    file both brokers read) and the roles of the users that are not devices."""

    password_file: Path | None
    roles_file: Path | None = None


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: the broker's certificate and key; for mutual TLS, the CA that signed the
    clients' certificates with ``require_certificate``, and the fleet's revocation list. With
    ``require_certificate`` the certificate's CN is the login (Mosquitto's
    ``use_identity_as_username``): no password is asked, and the client id must be that name."""

    certfile: Path
    keyfile: Path
    cafile: Path | None = None
    crlfile: Path | None = None
    require_certificate: bool = False


def broker_config(host: str, port: int, auth: BrokerAuth | None, tls: BrokerTls | None = None) -> dict[str, Any]:
    # A 'plugins' section replaces all of amqtt's defaults; the $SYS and packet-logging plugins
    # are left out (they cost CPU on every message).
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if tls is not None:
        listener.update(ssl=True, certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    listeners = {"default": listener}
    if auth is None:
        return {
            "listeners": listeners,
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    roles = str(auth.roles_file) if auth.roles_file is not None else None
    return {
        "listeners": listeners,
        "plugins": {
            "edgewire.broker.guard.FleetAuthPlugin": {
                "password_file": str(auth.password_file) if auth.password_file is not None else "",
                "roles_file": roles,
                "identity_from_certificate": tls is not None and tls.require_certificate,
            },
            "edgewire.broker.guard.FleetTopicPlugin": {"roles_file": roles},
        },
    }


class EmbeddedBroker:
    """``async with EmbeddedBroker(port=...)``: started on enter, stopped on exit.

    Logins need the fleet's passwords (``auth``), or with ``tls`` requiring certificates the
    fleet's client certificates, and every topic is checked against :mod:`edgewire.acl`; a
    broker open to anyone must be asked for (``allow_anonymous``, the demo and the tests on
    loopback). With logins, each device's connection is read at most ``read_budget`` packets a
    second (:mod:`edgewire.broker.pacing`); ``None`` reads every connection as fast as it comes."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        mdns: bool = False,
        name: str | None = None,
        auth: BrokerAuth | None = None,
        allow_anonymous: bool = False,
        tls: BrokerTls | None = None,
        read_budget: ReadBudget | None = ReadBudget(),  # noqa: B008 (frozen, never mutated)
    ):
        if auth is None and not allow_anonymous:
            raise BrokerError("the embedded broker needs a password file (or allow_anonymous for a lab or demo)")
        if auth is not None and allow_anonymous:
            raise BrokerError("give a password file or allow anonymous logins, not both")
        if auth is not None and auth.password_file is None and not (tls is not None and tls.require_certificate):
            raise BrokerError("without a password file, logins need client certificates (require_certificate)")
        self.tls = tls
        self.read_budget = read_budget
        self.host = host
        self.port = port
        self.auth = auth
        self.mdns = mdns
        # One instance name per broker on the link: mDNS refuses a name already taken.
        self.name = name or f"edgewire-{socket.gethostname()[:30]}-{port}"
        self._broker: GuardedBroker | None = None
        self._advertiser: Any = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls is not None else 'mqtt'}://{self.host}:{self.port}"

    async def start(self) -> None:
        # amqtt logs every refused MQTT 5 CONNECT (our clients' protocol probe) as a warning.
        for noisy in ("amqtt", "amqtt.broker", "transitions"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        _check_port_free(self.host, self.port)
        try:
            self._broker = GuardedBroker(broker_config(self.host, self.port, self.auth, self.tls))
            if self.auth is not None and self.read_budget is not None:
                self._broker.pacing = DevicePacing(self.read_budget, read_roles(self.auth.roles_file))
            if self.tls is not None:
                self._broker.tls_context = server_context(
                    self.tls.certfile,
                    self.tls.keyfile,
                    ca_file=self.tls.cafile,
                    crl_file=self.tls.crlfile,
                    require_certificate=self.tls.require_certificate,
                )
            await self._broker.start()
        except Exception as exc:
            raise BrokerError(f"embedded broker failed to start on {self.url}: {exc}") from None
        if self.mdns:
            from edgewire.mdns import MQTT_SERVICE, Advertiser

            address = self.host if self.host not in ("0.0.0.0", "") else _primary_address()
            self._advertiser = Advertiser(
                MQTT_SERVICE, self.name, self.port, addresses=[address], properties={"edgewire": "1"}
            )
            await self._advertiser.__aenter__()
        log.info("embedded broker listening on %s", self.url)

    async def stop(self) -> None:
        if self._advertiser is not None:
            with contextlib.suppress(Exception):
                await self._advertiser.__aexit__(None, None, None)
            self._advertiser = None
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._broker.shutdown(), 10)
            self._broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise BrokerError(
                f"cannot listen on {host}:{port}: {exc.strerror}; is another broker running? choose another --port"
            ) from None


def _primary_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: UDP connect only picks a route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
