"""The embedded broker's door: logins checked against the fleet's password file (or, with
mutual TLS, taken from the client certificate's CN, as Mosquitto's ``use_identity_as_username``),
the client id bound to that name, and every publish, subscription and delivery checked against
the one set of rules in :mod:`edgewire.acl`.

amqtt 0.12 looks a CONNECT's client id up among the existing sessions (and, for a clean
session, deletes the one it finds) before any plugin is asked about the login, so a client with
a wrong password, or with its own password and another's client id, could still knock that
client off. :class:`GuardedBroker` asks the plugins first and refuses the CONNECT before any
session is touched. amqtt's own TLS context accepts a client without a certificate and reads no
revocation list, so :class:`GuardedBroker` also builds the listener's context itself
(:func:`edgewire.tls.server_context`). amqtt 0.12 also hands a client that connects every
retained message any client's subscription matches, its own or not: :class:`GuardedBroker`
serves it only those of its own subscriptions. A device's connection is read through
:mod:`edgewire.broker.pacing` once its login is known, which means handing amqtt's session
handler a wrapped reader. Those four are the only amqtt internals used here (the release is
pinned in pyproject.toml and the tests cover them).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from amqtt.broker import Broker
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import AMQTTError, MQTTError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edgewire.acl import ROLES, Role, allowed, identity_ok
from edgewire.errors import ConfigError
from edgewire.passwords import read_password_file, verify_password
from edgewire.tls import peer_common_name, server_context

from .pacing import DevicePacing

log = logging.getLogger(__name__)


def read_roles(path: Path | None) -> dict[str, Role]:
    """username -> role from a YAML mapping; a user not named there is a device."""
    if path is None:
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of username to role")
    for name, role in data.items():
        if role not in ROLES:
            raise ConfigError(f"{path}: {name}: unknown role {role!r} (one of {', '.join(ROLES)})")
    return {str(k): v for k, v in data.items()}


def _file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a file changed (written in place or replaced): its inode, size and mtime."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _role_of(session: Session | None, roles: dict[str, Role]) -> tuple[str, Role] | None:
    if session is None or not session.username:
        return None
    return session.username, roles.get(session.username, "device")


class FleetAuthPlugin(BaseAuthPlugin):
    """A login is a known username, its password, and a client id the username may use; with
    ``identity_from_certificate``, the verified client certificate's CN is the username (any
    username and password the client sent are dropped) and the client id must be that name."""

    @dataclass
    class Config:
        password_file: str = ""
        roles_file: str | None = None
        identity_from_certificate: bool = False

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._password_file = Path(self.config.password_file) if self.config.password_file else None
        self._stamp = _file_stamp(self._password_file)
        self._users = read_password_file(self._password_file) if self._password_file else {}
        self._roles = read_roles(Path(self.config.roles_file) if self.config.roles_file else None)

    def _logins(self) -> dict[str, str]:
        """The password file as it is now: read again when it changed since the last login (a
        rotated password needs no restart, as Mosquitto's needs only ``kill -HUP``). A new file
        that cannot be read is logged and the logins read before stay."""
        path = self._password_file
        if path is None:
            return self._users
        stamp = _file_stamp(path)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._users = read_password_file(path)
                log.info("embedded broker: %s read again (%d logins)", path, len(self._users))
            except (OSError, ConfigError) as exc:
                log.error("embedded broker: %s changed but cannot be read (%s); the logins read before stay", path, exc)
        return self._users

    async def authenticate(self, *, session: Session) -> bool | None:
        if self.config.identity_from_certificate:
            return self._certificate_login(session)
        who = _role_of(session, self._roles)
        if who is None:
            log.warning("embedded broker: refused %s: no username (anonymous logins are off)", session.client_id)
            return False
        username, role = who
        hashed = self._logins().get(username)
        if hashed is None or not verify_password(session.password or "", hashed):
            log.warning("embedded broker: refused %s: bad username or password", session.client_id)
            return False
        if not identity_ok(role, username, session.client_id or ""):
            log.warning("embedded broker: refused client id %r for %r: not theirs", session.client_id, username)
            return False
        return True

    def _certificate_login(self, session: Session) -> bool:
        name = peer_common_name(session.ssl_object)
        if not name:
            log.warning("embedded broker: refused %s: no client certificate with a name", session.client_id)
            return False
        session.username, session.password = name, None
        role = self._roles.get(name, "device")
        if not identity_ok(role, name, session.client_id or ""):
            log.warning("embedded broker: refused client id %r for certificate %r: not theirs", session.client_id, name)
            return False
        return True


class FleetTopicPlugin(BaseTopicPlugin):
    """Publish, subscribe and receive, each checked against the role's grants."""

    @dataclass
    class Config:
        roles_file: str | None = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._roles = read_roles(Path(self.config.roles_file) if self.config.roles_file else None)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: AmqttAction | None = None
    ) -> bool | None:
        who = _role_of(session, self._roles)
        if who is None or topic is None:
            return False
        username, role = who
        mode = "write" if action == AmqttAction.PUBLISH else "read"
        ok = allowed(role, username, mode, topic)
        if not ok and action != AmqttAction.RECEIVE:
            log.warning("embedded broker: %s (%s) may not %s %s", username, role, mode, topic)
        return ok


class GuardedBroker(Broker):
    """amqtt's broker with the login checked before any session is looked up, and TLS
    listeners given our context (see above)."""

    #: Set by the embedded broker before start: the context every TLS listener serves with.
    tls_context: ssl.SSLContext | None = None
    #: Set by the embedded broker before start: how device logins' connections are read.
    pacing: DevicePacing | None = None

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:  # type: ignore[override]
        if self.tls_context is not None:
            return self.tls_context
        return server_context(Path(listener["certfile"]), Path(listener["keyfile"]))

    async def _publish_retained_messages_for_subscription(  # type: ignore[override]
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt 0.12 calls this on every connect for every filter any client holds, so a device
        # would be handed every retained message someone's wildcard matches (other devices'
        # presence, their desired configuration under an operator's ``#``), past the ACL. Only
        # the client's own subscriptions, each checked when it was made, are served here.
        holders = self._subscriptions.get(subscription[0], ())
        if any(held is session for held, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _handle_client_session(  # type: ignore[override]
        self, reader: Any, writer: Any, client_session: Session, *rest: Any
    ) -> None:
        # The login is known here (checked in _initialize_client_session) and amqtt attaches
        # this reader to the session's handler, whose loop reads every later packet from it.
        if self.pacing is not None:
            reader = self.pacing.reader(reader, client_session.username)
        await super()._handle_client_session(reader, writer, client_session, *rest)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        if not await self._authenticate(session, None):  # type: ignore[arg-type]
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            raise AMQTTError(f"login refused for client id {session.client_id!r} from {remote_address}")
        # From here on as amqtt does it (amqtt.broker.Broker._initialize_client_session, 0.12).
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session
