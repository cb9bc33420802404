"""One MQTT connection that outlives network drops, shared by every edgewire component.

Shaped like aiomqtt's client: an async context manager and an async iterator of messages.
Underneath it reconnects with capped exponential backoff, restores subscriptions, and keeps a
retained presence: a birth message after each connect and a last-will the broker publishes if
the process vanishes. It speaks MQTT 5 where the broker does and falls back to 3.1.1 where it
does not (amqtt refuses an MQTT 5 CONNECT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import aiomqtt
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgewire import envelopes as env
from edgewire import topics
from edgewire.aio import cancel_and_wait
from edgewire.errors import EdgewireError
from edgewire.metrics import Meter

log = logging.getLogger(__name__)

Protocol = Literal["auto", "5", "3.1.1"]
PresenceFactory = Callable[[bool], env.Presence]


class NotConnected(EdgewireError):
    """The broker could not be reached in time."""


class MqttSession:
    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        protocol: Protocol = "auto",
        presence: PresenceFactory | None = None,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 30.0,
        meter: Meter | None = None,
        persistent: bool = False,
        resolver: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        session_expiry_s: int = 86_400,
        max_inflight: int = 256,
    ) -> None:
        self.client_id = client_id
        self.host = host
        self.port = port
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._protocol: Protocol = protocol
        self._presence = presence
        self._backoff = (reconnect_min_s, reconnect_max_s)
        # A persistent session keeps the client's subscriptions and queued QoS 1 messages at the
        # broker while it is away (clean session off / clean start off with an expiry).
        self._persistent = persistent
        self._session_expiry_s = session_expiry_s
        self._max_inflight = max_inflight
        # Asked for the broker's address before connecting, and again after a failed attempt.
        self._resolver = resolver
        self._configured_protocol: Protocol = protocol
        self.meter = meter or Meter(client_id)
        self._subscriptions: dict[str, int] = {}
        # Unbounded on purpose: paho acknowledges a QoS 1 message before we see it, so dropping
        # it here would lose an acknowledged message. Consumers keep up or apply backpressure.
        self._inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connects = 0
        self._published = 0
        self.last_error: str | None = None

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
    def protocol(self) -> Protocol:
        return self._protocol

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise NotConnected(
                f"no connection to mqtt://{self.host}:{self.port} after {timeout}s"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            ) from None

    # -- traffic -----------------------------------------------------------------------------

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        self._subscriptions[topic_filter] = qos
        if self._client is not None and self._connected.is_set():
            await self._client.subscribe(topic_filter, qos=qos)

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
        client = self._client
        assert client is not None
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            if qos == 0:
                self.meter.inc("publish_dropped_total")
                return False
            raise NotConnected(f"publish to {topic} failed: {exc}") from exc
        self._published += 1
        return True

    async def publish_many(self, items: list[tuple[str, bytes]], *, qos: int = 0, retain: bool = False) -> int:
        """Publish a burst at once; returns how many went out.

        Issuing them together lets the MQTT client write every queued packet in one pass of the
        event loop instead of one loop round trip per message; under load this is what keeps
        result publishing off the critical path.
        """
        if not items:
            return 0
        if not self._connected.is_set() and qos == 0:
            self.meter.inc("publish_dropped_total", len(items))
            return 0
        outcomes = await asyncio.gather(
            *(self.publish(topic, payload, qos=qos, retain=retain) for topic, payload in items),
            return_exceptions=True,
        )
        sent = sum(1 for o in outcomes if o is True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise NotConnected(f"{len(failures)} of {len(items)} publishes failed: {failures[0]}")
        return sent

    async def refresh_presence(self) -> None:
        """Publish the birth message again, after the state it reports has changed."""
        client = self._client
        if client is None or not self._connected.is_set() or self._presence is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self._presence_topic, env.encode(self._presence(True)), qos=1, retain=True)

    def drain_inbox(self) -> list[aiomqtt.Message]:
        """Messages received but not yet taken, for a consumer that stops gracefully."""
        out = []
        while not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    async def messages(self) -> AsyncIterator[aiomqtt.Message]:
        """Every message received on any subscription, across reconnects."""
        while True:
            yield await self._inbox.get()

    # -- the connection loop -----------------------------------------------------------------

    @property
    def _presence_topic(self) -> str:
        return topics.PRESENCE.build(client_id=self.client_id)

    def _make_client(self, protocol: ProtocolVersion) -> aiomqtt.Client:
        will = None
        if self._presence is not None:
            will = aiomqtt.Will(self._presence_topic, env.encode(self._presence(False)), qos=1, retain=True)
        inbox = self._inbox
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        class _Forward(asyncio.Queue):  # type: ignore[type-arg]
            """aiomqtt's incoming queue, short-circuited into the session's inbox, so no task
            is spent per message; aiomqtt's own iterator then only waits for a disconnect.

            paho can deliver a message from the thread that runs the connect handshake (a
            persistent session's queued messages arrive right after CONNACK), so a put from
            any other thread is handed to the loop instead of touching the queue directly."""

            def put_nowait(self, item: aiomqtt.Message) -> None:
                if threading.get_ident() == loop_thread:
                    inbox.put_nowait(item)
                else:
                    loop.call_soon_threadsafe(inbox.put_nowait, item)

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
            **self._session_options(protocol),
        )
        # aiomqtt warns past 10 unacknowledged publishes; we run up to max_inflight on purpose.
        client.pending_calls_threshold = self._max_inflight
        return client

    def _session_options(self, protocol: ProtocolVersion) -> dict[str, Any]:
        if protocol == ProtocolVersion.V5:
            if not self._persistent:
                return {"clean_start": True}
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry_s
            return {"clean_start": False, "properties": props}
        return {"clean_session": not self._persistent}

    async def _negotiate(self) -> Protocol:
        """Ask the broker with a bare MQTT 5 CONNECT; a refusal means 3.1.1.

        The probe carries no will on purpose: amqtt misparses an MQTT 5 CONNECT with a will and
        leaves it hanging instead of refusing it, while a bare one is refused at once.
        """
        probe = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"{self.client_id[:40]}-probe-{secrets.token_hex(3)}",
            username=self._username,
            password=self._password,
            protocol=ProtocolVersion.V5,
            timeout=10,
        )
        try:
            async with probe:
                return "5"
        except MqttConnectError:
            return "3.1.1"

    async def _connect(self) -> aiomqtt.Client:
        if self._resolver is not None and (self.connects == 0 or self.last_error is not None):
            address = await self._resolver()
            if address != (self.host, self.port):
                self.host, self.port = address
                self._protocol = self._configured_protocol  # another broker may speak another MQTT
        if self._protocol == "auto":
            self._protocol = await self._negotiate()
            log.info("%s: broker speaks MQTT %s", self.client_id, self._protocol)
        version = ProtocolVersion.V5 if self._protocol == "5" else ProtocolVersion.V311
        client = self._make_client(version)
        await client.__aenter__()
        return client

    async def _run(self) -> None:
        delay = self._backoff[0]
        while not self._closing:
            try:
                client = await self._connect()
            except (aiomqtt.MqttError, OSError, EdgewireError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.debug("%s: connect failed: %s; retry in %.1fs", self.client_id, self.last_error, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            self.last_error = None
            try:
                await self._serve(client)
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
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
            if not self._closing:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _serve(self, client: aiomqtt.Client) -> None:
        for topic_filter, qos in self._subscriptions.items():
            await client.subscribe(topic_filter, qos=qos)
        if self._presence is not None:
            await client.publish(self._presence_topic, env.encode(self._presence(True)), qos=1, retain=True)
        self._client = client
        self.connects += 1
        if self.connects > 1:
            self.meter.inc("mqtt_reconnects_total")
        self.meter.set("mqtt_connected", 1)
        self._connected.set()
        log.info("%s: connected to mqtt://%s:%s", self.client_id, self.host, self.port)
        async for _ in client.messages:  # messages go straight to the inbox; this ends on disconnect
            pass


def presence_factory(client_id: str, kind: str, **fields: object) -> PresenceFactory:
    """Birth / will payloads for a client; ``fields`` fill the optional Presence fields."""
    from edgewire import __version__

    def make(online: bool) -> env.Presence:
        return env.Presence(
            client_id=client_id, kind=kind, online=online, ts=time.time(), software=__version__, **fields
        )

    return make
