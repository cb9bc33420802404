"""One MQTT connection that outlives network drops, shared by every edgewire component.

Shaped like aiomqtt's client: an async context manager and an async iterator of messages.
Underneath it reconnects with capped exponential backoff and full jitter (edgewire.backoff),
restores subscriptions, and keeps a retained presence: a birth message after each connect and a
last-will the broker publishes if the process vanishes. It speaks MQTT 5 where the broker does
and falls back to 3.1.1 where it does not (edgewire.mqtt_protocol).

Throughput comes from edgewire.mqtt_fastpath, installed on each connection's client when the
installed paho-mqtt and aiomqtt are the tested releases; without it (``EDGEWIRE_MQTT_FASTPATH=0``,
or other releases) the same session publishes through aiomqtt's public API
(edgewire.mqtt_sender). Nothing here reaches into paho's or aiomqtt's internals but the one
marked switch for manual acknowledgements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiomqtt
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttCodeError

from edgewire import envelopes as env
from edgewire import mqtt_fastpath, topics
from edgewire.aio import cancel_and_wait
from edgewire.backoff import Backoff
from edgewire.errors import EdgewireError
from edgewire.metrics import Meter
from edgewire.mqtt_protocol import MqttVersion, negotiate, session_options
from edgewire.mqtt_sender import AiomqttSender, Sender
from edgewire.tls import client_context

if TYPE_CHECKING:
    from edgewire.config import BrokerSettings

log = logging.getLogger(__name__)

PresenceFactory = Callable[[bool], env.Presence]


class NotConnected(EdgewireError):
    """The broker could not be reached in time."""


class InboundMessage:
    """One message received from the broker, as :meth:`MqttSession.messages` yields it.

    Leaner than aiomqtt's: the topic is a plain string (components parse it with
    edgewire.topics), and the payload is bytes, or for a large one the bytearray it arrived in.
    """

    __slots__ = ("mid", "payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: bytes | bytearray, qos: int, retain: bool, mid: int = 0) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.mid = mid

    def __repr__(self) -> str:
        return f"InboundMessage({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, retain={self.retain})"


class MqttSession:
    """A broker connection for a component's whole life: ``async with`` it, publish, iterate
    :meth:`messages`. Drops and reconnects happen underneath; a publish that needs the link and
    cannot have it in time raises NotConnected."""

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        protocol: MqttVersion = "auto",
        presence: PresenceFactory | None = None,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 30.0,
        meter: Meter | None = None,
        persistent: bool = False,
        resolver: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        session_expiry_s: int = 86_400,
        max_inflight: int = 256,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.client_id = client_id
        self._tls = tls  # the broker's certificate checked with it (edgewire.tls); None: plain TCP
        self.host = host
        self.port = port
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._protocol: MqttVersion = protocol
        self._presence = presence
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        # A persistent session keeps the client's subscriptions and queued QoS 1 messages at the
        # broker while it is away (clean session off / clean start off with an expiry).
        self._persistent = persistent
        self._session_expiry_s = session_expiry_s
        self._max_inflight = max_inflight
        # Asked for the broker's address before connecting, and again after a failed attempt.
        self._resolver = resolver
        self._configured_protocol: MqttVersion = protocol
        self.meter = meter or Meter(client_id)
        self._subscriptions: dict[str, int] = {}
        # Unbounded on purpose: paho acknowledges a QoS 1 message before we see it, so dropping
        # it here would lose an acknowledged message. Consumers keep up or apply backpressure.
        self._inbox: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._sender: Sender | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._holding = False
        self.connects = 0
        # When the broker last accepted this client (time.monotonic()), for measuring how fast
        # a fleet comes back after a broker restart.
        self.connected_at = 0.0
        self._published = 0
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, client_id: str, broker: BrokerSettings, **options: Any) -> MqttSession:
        """A session configured from a component's ``broker:`` settings (address, credentials,
        keepalive, protocol, backoff); ``options`` add or override the rest."""
        fields: dict[str, Any] = {
            "host": broker.host,
            "port": broker.port,
            "username": broker.username,
            "password": broker.password,
            "keepalive": broker.keepalive,
            "protocol": broker.protocol,
            "reconnect_min_s": broker.reconnect_min_s,
            "reconnect_max_s": broker.reconnect_max_s,
            "tls": client_context(broker.ca_file, broker.cert_file, broker.key_file) if broker.tls else None,
        }
        return cls(client_id, **{**fields, **options})

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> MqttSession:
        self._task = asyncio.create_task(self._run(), name=f"mqtt-session-{self.client_id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        client = self._client
        if client is not None and self._connected.is_set() and self._presence is not None:
            # A clean goodbye replaces the retained birth; the will is only for crashes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    client.publish(self._presence_topic, env.encode(self._presence(False)), qos=1, retain=True),
                    2.0,
                )
        await cancel_and_wait(self._task)
        self._connected.clear()
        self._client = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def published(self) -> int:
        """Messages handed to the broker since the session started."""
        return self._published

    @property
    def protocol(self) -> MqttVersion:
        return self._protocol

    @property
    def url(self) -> str:
        return f"{'mqtts' if self._tls is not None else 'mqtt'}://{self.host}:{self.port}"

    @property
    def fast_path(self) -> bool:
        """Whether the live connection runs edgewire.mqtt_fastpath (False while disconnected)."""
        return isinstance(self._sender, mqtt_fastpath.FastPath)

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise NotConnected(
                f"no connection to {self.url} after {timeout}s"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            ) from None

    # -- traffic -----------------------------------------------------------------------------

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        await self.subscribe_all([topic_filter], qos)

    async def subscribe_all(self, topic_filters: list[str], qos: int = 1) -> None:
        """Several subscriptions in one SUBSCRIBE (one round trip however many); kept as
        :meth:`subscribe` keeps them."""
        if not topic_filters:
            return
        for topic_filter in topic_filters:
            self._subscriptions[topic_filter] = qos
        if self._client is not None and self._connected.is_set():
            await self._client.subscribe([(f, qos) for f in topic_filters])

    async def unsubscribe(self, *topic_filters: str) -> None:
        """Unsubscribe now if connected, and no longer after reconnects."""
        if not topic_filters:
            return
        for topic_filter in topic_filters:
            self._subscriptions.pop(topic_filter, None)
        if self._client is not None and self._connected.is_set():
            await self._client.unsubscribe(list(topic_filters))

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,
    ) -> bool:
        """Publish one message. QoS 0 while disconnected is dropped (and counted);
        QoS 1 and 2 wait up to ``timeout`` for the link, then raise NotConnected."""
        if not self._connected.is_set():
            if qos == 0:
                self.meter.inc("publish_dropped_total")
                return False
            await self.wait_connected(timeout)
        sender = self._sender
        assert sender is not None
        try:
            waiter = sender.send(topic, payload, qos, retain)
            if waiter is not None:
                await waiter
        except aiomqtt.MqttError as exc:
            if qos == 0:
                self.meter.inc("publish_dropped_total")
                return False
            raise NotConnected(f"publish to {topic} failed: {exc}") from exc
        self._published += 1
        return True

    def publish_soon(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> asyncio.Future[None]:
        """Queue one publish on the live connection and return at once; the future settles
        when the broker has it (for QoS 0, when it is written) and fails if the link drops
        first. Raises NotConnected, queueing nothing, when the link is down now: a caller that
        can wait for it uses :meth:`publish`."""
        sender = self._sender
        if sender is None or not self._connected.is_set():
            raise NotConnected(f"publish to {topic}: not connected")
        try:
            waiter = sender.send(topic, payload, qos, retain)
        except MqttCodeError as exc:
            raise NotConnected(f"publish to {topic} failed: {exc}") from exc
        self._published += 1
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            waiter.set_result(None)
        return waiter

    async def publish_many(self, items: list[tuple[str, bytes]], *, qos: int = 0, retain: bool = False) -> int:
        """Publish a burst at once; returns how many went out.

        Every packet is queued before any is written, so (on the fast path) the MQTT client
        sends the whole burst in one write and one pass of the event loop instead of one round
        trip per message; under load this is what keeps result publishing off the critical path.
        """
        if not items:
            return 0
        if not self._connected.is_set():
            if qos == 0:
                self.meter.inc("publish_dropped_total", len(items))
                return 0
            await self.wait_connected(None)
        sender = self._sender
        assert sender is not None
        waits: list[asyncio.Future[None]] = []
        failures: list[BaseException] = []
        sent = 0
        for topic, payload in items:
            try:
                waiter = sender.send(topic, payload, qos, retain)
            except MqttCodeError as exc:
                failures.append(exc)
                continue
            if waiter is None:
                sent += 1
            else:
                waits.append(waiter)
        if waits:
            # Futures, not coroutines: gathering them costs no task per message.
            for outcome in await asyncio.gather(*waits, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    failures.append(outcome)
                else:
                    sent += 1
        self._published += sent
        if failures:
            if qos == 0:
                self.meter.inc("publish_dropped_total", len(failures))
                return sent
            raise NotConnected(f"{len(failures)} of {len(items)} publishes failed: {failures[0]}")
        return sent

    async def refresh_presence(self) -> None:
        """Publish the birth message again, after the state it reports has changed."""
        client = self._client
        if client is None or not self._connected.is_set() or self._presence is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self._presence_topic, env.encode(self._presence(True)), qos=1, retain=True)

    def hold_acks(self) -> None:
        """Acknowledge nothing that arrives from now on, and do not deliver it.

        For a consumer about to leave: what is in the inbox now was acknowledged and must still be
        handled (``drain_inbox``); anything later stays the broker's, which delivers it again to
        this session's next connection (a persistent session) instead of it being lost here."""
        self._holding = True
        client = self._client
        if client is not None:
            _manual_acks(client)

    def drain_inbox(self) -> list[InboundMessage]:
        """Messages received but not yet taken, for a consumer that stops gracefully."""
        out = []
        while not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    async def messages(self) -> AsyncIterator[InboundMessage]:
        """Every message received on any subscription, across reconnects."""
        while True:
            yield await self._inbox.get()

    # -- the connection loop -----------------------------------------------------------------

    @property
    def _presence_topic(self) -> str:
        return topics.PRESENCE.build(client_id=self.client_id)

    def _make_client(self, protocol: ProtocolVersion) -> tuple[aiomqtt.Client, Sender]:
        """A client for one connection, and what publishes on it: the fast path where it is
        installed, aiomqtt's own publish where not."""
        will = None
        if self._presence is not None:
            will = aiomqtt.Will(self._presence_topic, env.encode(self._presence(False)), qos=1, retain=True)
        inbox = self._inbox
        session = self
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def deliver(topic: str, payload: bytes | bytearray, qos: int, retain: bool, mid: int) -> None:
            if session._holding:  # not acknowledged: the broker delivers it again next session
                session.meter.inc("messages_held_back_total")
                return
            message = InboundMessage(topic, payload, qos, retain, mid)
            if threading.get_ident() == loop_thread:
                inbox.put_nowait(message)
            else:
                loop.call_soon_threadsafe(inbox.put_nowait, message)

        class _Forward(asyncio.Queue):  # type: ignore[type-arg]
            """aiomqtt's incoming queue (its ``queue_type``), short-circuited into the session's
            inbox, so no task is spent per message; aiomqtt's own iterator then only waits for a
            disconnect. On the fast path only messages it leaves to paho come here.

            paho can deliver a message from the thread that runs the connect handshake (a
            persistent session's queued messages arrive right after CONNACK), so a put from
            any other thread is handed to the loop instead of touching the queue directly."""

            def put_nowait(self, item: aiomqtt.Message) -> None:
                payload = item.payload
                assert isinstance(payload, (bytes, bytearray))  # paho hands over bytes
                deliver(str(item.topic), payload, item.qos, item.retain, item.mid)

        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self._username,
            password=self._password,
            keepalive=self._keepalive,
            will=will,
            protocol=protocol,
            timeout=10,
            queue_type=_Forward,
            max_inflight_messages=self._max_inflight,
            # Small request/answer messages must not wait for Nagle's algorithm (~40 ms stalls).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            tls_context=self._tls,
            **session_options(protocol, persistent=self._persistent, session_expiry_s=self._session_expiry_s),
        )
        # aiomqtt warns past 10 unacknowledged publishes; we run up to max_inflight on purpose.
        client.pending_calls_threshold = self._max_inflight
        if self._holding:
            _manual_acks(client)
        sender: Sender | None = mqtt_fastpath.install(client, deliver)
        return client, sender or AiomqttSender(client)

    async def _connect(self) -> tuple[aiomqtt.Client, Sender]:
        if self._resolver is not None and (self.connects == 0 or self.last_error is not None):
            address = await self._resolver()
            if address != (self.host, self.port):
                self.host, self.port = address
                self._protocol = self._configured_protocol  # another broker may speak another MQTT
        if self._protocol == "auto":
            self._protocol = await negotiate(self.host, self.port, self.client_id, self._tls)
            log.info("%s: broker speaks MQTT %s", self.client_id, self._protocol)
        version = ProtocolVersion.V5 if self._protocol == "5" else ProtocolVersion.V311
        client, sender = self._make_client(version)
        await client.__aenter__()
        return client, sender

    async def _run(self) -> None:
        while not self._closing:
            try:
                client, sender = await self._connect()
            except (aiomqtt.MqttError, OSError, EdgewireError) as exc:
                error = str(exc) or type(exc).__name__
                # A new reason is worth a warning (a refused login, an untrusted certificate); its repeats are not.
                level = logging.DEBUG if error == self.last_error else logging.WARNING
                self.last_error = error
                delay = self._backoff.next_delay()
                log.log(level, "%s: connect to %s failed: %s; retry in %.2fs", self.client_id, self.url, error, delay)
                await asyncio.sleep(delay)
                continue
            self.connected_at = time.monotonic()
            self._backoff.reset()
            self.last_error = None
            try:
                await self._serve(client, sender)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("%s: connection lost: %s", self.client_id, self.last_error)
            except Exception as exc:  # a bug must not silently end the connection loop
                self.last_error = repr(exc)
                log.exception("%s: connection loop error", self.client_id)
            finally:
                self._connected.clear()
                self.meter.set("mqtt_connected", 0)
                self._client = None
                self._sender = None
                # A publish in flight ends with its connection (NotConnected), not after the
                # client's timeout: this client is never reused, so no acknowledgement can come.
                sender.fail_all()
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
            if not self._closing:
                # Every client of a restarted broker lost it at once: spread the first retry.
                await asyncio.sleep(self._backoff.next_delay())

    async def _serve(self, client: aiomqtt.Client, sender: Sender) -> None:
        if self._subscriptions:  # one SUBSCRIBE, however many filters (a bridge may hold many)
            await client.subscribe(list(self._subscriptions.items()))
        if self._presence is not None:
            await client.publish(self._presence_topic, env.encode(self._presence(True)), qos=1, retain=True)
        self._client = client
        self._sender = sender
        self.connects += 1
        if self.connects > 1:
            self.meter.inc("mqtt_reconnects_total")
        self.meter.set("mqtt_connected", 1)
        self._connected.set()
        log.info("%s: connected to %s", self.client_id, self.url)
        async for _ in client.messages:  # messages go straight to the inbox; this ends on disconnect
            pass


def _manual_acks(client: aiomqtt.Client) -> None:
    """Stop acknowledging received QoS 1 messages (the broker keeps them for the next session)."""
    client._client.manual_ack_set(True)  # noqa: SLF001 - aiomqtt exposes no manual-ack switch; paho's is public


def presence_factory(client_id: str, kind: str, **fields: object) -> PresenceFactory:
    """Birth / will payloads for a client; ``fields`` fill the optional Presence fields."""
    from edgewire import __version__

    def make(online: bool) -> env.Presence:
        return env.Presence(
            client_id=client_id, kind=kind, online=online, ts=time.time(), software=__version__, **fields
        )

    return make
