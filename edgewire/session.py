"""One MQTT connection that outlives network drops, shared by every edgewire component.

Shaped like aiomqtt's client: an async context manager and an async iterator of messages.
Underneath it reconnects with capped exponential backoff, restores subscriptions, and keeps a
retained presence: a birth message after each connect and a last-will the broker publishes if
the process vanishes. It speaks MQTT 5 where the broker does and falls back to 3.1.1 where it
does not (amqtt refuses an MQTT 5 CONNECT).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import aiomqtt
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttCodeError, MqttConnectError
from paho.mqtt import client as mqtt
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgewire import envelopes as env
from edgewire import topics
from edgewire.aio import cancel_and_wait
from edgewire.errors import EdgewireError
from edgewire.metrics import Meter

if TYPE_CHECKING:
    from edgewire.config import BrokerSettings

log = logging.getLogger(__name__)

Protocol = Literal["auto", "5", "3.1.1"]
PresenceFactory = Callable[[bool], env.Presence]


class NotConnected(EdgewireError):
    """The broker could not be reached in time."""


class Message:
    """One message from the broker, as :meth:`MqttSession.messages` yields it.

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
        return f"Message({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, retain={self.retain})"


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
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._holding = False
        self.connects = 0
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
            waiter = _queue(client, topic, payload, qos, retain)
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
        client = self._client
        if client is None or not self._connected.is_set():
            raise NotConnected(f"publish to {topic}: not connected")
        try:
            waiter = _queue(client, topic, payload, qos, retain)
        except MqttCodeError as exc:
            raise NotConnected(f"publish to {topic} failed: {exc}") from exc
        self._published += 1
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            waiter.set_result(None)
        return waiter

    async def publish_many(self, items: list[tuple[str, bytes]], *, qos: int = 0, retain: bool = False) -> int:
        """Publish a burst at once; returns how many went out.

        Every packet is queued before any is written, so the MQTT client sends the whole burst
        in one write and one pass of the event loop instead of one round trip per message;
        under load this is what keeps result publishing off the critical path.
        """
        if not items:
            return 0
        if not self._connected.is_set():
            if qos == 0:
                self.meter.inc("publish_dropped_total", len(items))
                return 0
            await self.wait_connected(None)
        client = self._client
        assert client is not None
        waits: list[asyncio.Future[None]] = []
        failures: list[BaseException] = []
        sent = 0
        for topic, payload in items:
            try:
                waiter = _queue(client, topic, payload, qos, retain)
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
            client._client.manual_ack_set(True)

    def drain_inbox(self) -> list[Message]:
        """Messages received but not yet taken, for a consumer that stops gracefully."""
        out = []
        while not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    async def messages(self) -> AsyncIterator[Message]:
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
        session = self
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        class _Forward(asyncio.Queue):  # type: ignore[type-arg]
            """aiomqtt's incoming queue, short-circuited into the session's inbox, so no task
            is spent per message; aiomqtt's own iterator then only waits for a disconnect.

            paho can deliver a message from the thread that runs the connect handshake (a
            persistent session's queued messages arrive right after CONNACK), so a put from
            any other thread is handed to the loop instead of touching the queue directly."""

            def put_nowait(self, item: aiomqtt.Message) -> None:
                deliver(Message(str(item.topic), item.payload, item.qos, item.retain, item.mid))  # type: ignore[arg-type]

        def deliver(message: Message) -> None:
            if session._holding:  # not acknowledged: the broker delivers it again next session
                session.meter.inc("messages_held_back_total")
                return
            if threading.get_ident() == loop_thread:
                inbox.put_nowait(message)
            else:
                loop.call_soon_threadsafe(inbox.put_nowait, message)

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
        if self._holding:
            client._client.manual_ack_set(True)
        # publish() waits on these; aiomqtt's on_publish callback resolves them by message id.
        acks = client._edgewire_acks = _Acks(client, loop)  # type: ignore[attr-defined]
        paho = client._client
        aiomqtt_on_disconnect = paho.on_disconnect

        def on_disconnect(*args: Any) -> None:
            # A publish in flight ends with its connection (NotConnected), not after the
            # client's timeout: this client is never reused, so no acknowledgement can come.
            try:
                aiomqtt_on_disconnect(*args)
            finally:
                if threading.get_ident() == loop_thread:
                    acks.fail_all()
                else:
                    loop.call_soon_threadsafe(acks.fail_all)

        paho.on_disconnect = on_disconnect
        _coalesce_writes(client._client)
        _buffer_reads(client._client)
        _publish_fast_path(client._client, deliver, client._pending_publishes)
        client._edgewire_publish = _lean_publish(client._client)  # type: ignore[attr-defined]
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


class _Acks:
    """Waiters for publish completions on one aiomqtt client, with one shared timeout timer.

    aiomqtt's own publish spends an Event, an ``asyncio.wait_for`` task and a timer on every
    message; here a message costs one future, registered where aiomqtt's on_publish callback
    looks (``_pending_publishes``: it calls ``.set()`` on what it finds by message id). Waits
    end after the client's timeout like aiomqtt's, with the same MqttError.
    """

    class _Waiter:
        __slots__ = ("deadline", "fut")

        def __init__(self, fut: asyncio.Future[None], deadline: float) -> None:
            self.fut = fut
            self.deadline = deadline

        def set(self) -> None:  # what aiomqtt's on_publish calls
            if not self.fut.done():
                self.fut.set_result(None)

    def __init__(self, client: aiomqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self._pending: dict[int, Any] = client._pending_publishes
        self._timeout = client.timeout
        self._loop = loop
        self._order: collections.deque[tuple[int, _Acks._Waiter]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def register(self, mid: int) -> asyncio.Future[None]:
        """A future that completes when message ``mid`` is published, or fails on timeout."""
        if mid in self._pending:
            raise RuntimeError(f'There already exists a pending call for message ID "{mid}"')
        fut = self._loop.create_future()
        waiter = self._Waiter(fut, self._loop.time() + self._timeout)
        self._pending[mid] = waiter
        self._order.append((mid, waiter))
        if self._timer is None:
            self._timer = self._loop.call_at(waiter.deadline, self._expire)
        return fut

    def fail_all(self) -> None:
        """End every wait: the connection is gone."""
        order, self._order = self._order, collections.deque()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for mid, waiter in order:
            if not waiter.fut.done():
                waiter.fut.set_exception(aiomqtt.MqttError("Disconnected before the broker acknowledged"))
            if self._pending.get(mid) is waiter:
                del self._pending[mid]

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        order = self._order
        while order:
            mid, waiter = order[0]
            if not waiter.fut.done():
                if waiter.deadline > now:
                    break
                waiter.fut.set_exception(aiomqtt.MqttError("Operation timed out"))
            order.popleft()
            if self._pending.get(mid) is waiter:  # timed out, or its waiter went away unacknowledged
                del self._pending[mid]
        if order:
            self._timer = self._loop.call_at(order[0][1].deadline, self._expire)


def _queue(client: aiomqtt.Client, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Future[None] | None:
    """Hand one message to paho. Straight to paho, as aiomqtt's publish does, but the wait for
    the broker's acknowledgement (or, at QoS 0, for the write) is one future on the client's
    shared ack tracker instead of an Event, a wait_for task and a timer per message. None when
    the message is out already; MqttCodeError when paho refused it."""
    info = client._edgewire_publish(topic, payload, qos, retain)  # type: ignore[attr-defined]
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise MqttCodeError(info.rc, "Could not publish message")
    if info.is_published():
        return None
    acks: _Acks = client._edgewire_acks  # type: ignore[attr-defined]
    return acks.register(info.mid)


#: Packets written by one gather-write (below the kernel's IOV_MAX of 1024).
_GATHER_MAX = 256
#: Bytes joined per send where a gather-write is not available (TLS, websockets).
_JOIN_BYTES = 256 * 1024


def _coalesce_writes(paho: mqtt.Client) -> None:
    """Make paho write every queued packet with one send instead of one send per packet.

    Under load the event loop queues many PUBACKs and PUBLISHes between two writes; on a busy
    host each send on a TCP socket costs more than building the packet. The packets go out as
    one gather-write of views into them: paho itself re-slices (copies) the unsent rest of a
    packet after every partial send, which for a model chunk of a megabyte is quadratic. Only
    packets whose completion paho does nothing for beyond dropping them (all but QoS 0 PUBLISH
    and DISCONNECT) are written here; from the first other kind on, paho's own code writes.
    """
    original = paho._packet_write
    out: collections.deque[Any] = paho._out_packet
    publish_qos0, disconnect = mqtt.PUBLISH, mqtt.DISCONNECT

    def plain(packet: Any) -> bool:
        kind = packet["command"] & 0xF0
        return kind != disconnect and not (kind == publish_qos0 and packet["qos"] == 0)

    def send(views: list[memoryview]) -> int:
        sock = paho._sock
        if type(sock) is socket.socket:  # plain TCP: gather-write, no copy of the payloads
            return sock.sendmsg(views)
        # TLS or websockets: one joined buffer, bounded so a large backlog is not copied per send.
        data, size = [], 0
        for view in views:
            data.append(view[: _JOIN_BYTES - size])
            size += len(data[-1])
            if size >= _JOIN_BYTES:
                break
        return paho._sock_send(b"".join(data))

    def packet_write() -> mqtt.MQTTErrorCode:
        while out:
            packets = []
            for packet in out:
                if not plain(packet) or len(packets) == _GATHER_MAX:
                    break
                packets.append(packet)
            if not packets:
                break
            views = [memoryview(p["packet"])[p["pos"] :] for p in packets]
            try:
                sent = send(views)
            except (AttributeError, ValueError):
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:
                log.debug("send failed", exc_info=True)
                return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
            finally:
                for view in views:
                    view.release()
            for packet in packets:
                if sent <= 0:
                    break
                step = min(sent, packet["to_process"])
                packet["to_process"] -= step
                packet["pos"] += step
                sent -= step
                if packet["to_process"]:
                    break
                out.popleft()
            with paho._msgtime_mutex:
                paho._last_msg_out = mqtt.time_func()
        return original()

    paho._packet_write = packet_write  # type: ignore[method-assign]


def _cut(buf: bytearray, start: int, end: int) -> bytearray:
    """One copy of ``buf[start:end]`` (slicing a bytearray and wrapping it would make two)."""
    with memoryview(buf) as view:
        return bytearray(view[start:end])


def _buffer_reads(paho: mqtt.Client) -> None:
    """Make paho read the socket in large chunks and cut packets out of a buffer.

    paho reads a packet's first byte, then its length byte by byte, then its body, each with
    its own recv; a burst of small PUBLISHes and PUBACKs costs a system call per few bytes.
    Here one recv takes whatever the socket holds and each whole packet in it goes to paho's
    own packet handling. A packet left in the buffer never waits for the socket to become
    readable again: loop_read keeps going while the buffer holds a whole one. A body larger
    than one read (a model chunk) is received straight into its own buffer, as much as the
    socket holds per call: no copy through the read buffer, and no loop pass per 64 KiB.
    """
    original_recv = paho._sock_recv
    original_loop_read = paho.loop_read
    buf = bytearray()
    chunk = 1 << 16
    codes = mqtt.MQTTErrorCode
    #: The packet whose body is being received in place: [command, length bytes, body, bytes held].
    large: list[Any] = []

    def header() -> tuple[int, int]:
        """(header length, total length) of the first packet in the buffer, whole or not;
        (0, 0) while its fixed header is incomplete, (-1, -1) when its length field is malformed."""
        have = len(buf)
        length, mult = 0, 1
        for i in range(1, 5):
            if i >= have:
                return 0, 0
            byte = buf[i]
            length += (byte & 127) * mult
            mult *= 128
            if not byte & 128:
                return i + 1, i + 1 + length
        return -1, -1

    def whole_packet_held() -> bool:
        head, total = header()
        return head < 0 or (head > 0 and len(buf) >= total)

    def start_large(head: int, total: int) -> None:
        body = bytearray(total - head)
        held = len(buf) - head
        body[:held] = memoryview(buf)[head:]
        large[:] = [buf[0], list(buf[1:head]), body, held]
        buf.clear()

    def fill_large() -> mqtt.MQTTErrorCode | None:
        """Receive the large body's rest; None once it is whole, else why not yet."""
        body, held = large[2], large[3]
        sock = paho._sock
        try:
            with memoryview(body) as view:
                while held < len(body):
                    if type(sock) is socket.socket:
                        with view[held:] as rest:
                            n = sock.recv_into(rest)
                    else:  # TLS or websockets: paho's own receive
                        data = original_recv(min(len(body) - held, 1 << 20))
                        n = len(data)
                        view[held : held + n] = data
                    if n == 0:
                        return codes.MQTT_ERR_CONN_LOST
                    held += n
        except BlockingIOError:
            return codes.MQTT_ERR_AGAIN
        except (OSError, AttributeError, ConnectionError) as err:  # TimeoutError included
            log.debug("mqtt receive failed: %s", err)
            return codes.MQTT_ERR_CONN_LOST
        finally:
            large[3] = held
        return None

    def packet_read() -> mqtt.MQTTErrorCode:
        if not large:
            head, total = header()
            if head == 0 or (head > 0 and len(buf) < total):
                if head > 0 and total - len(buf) > chunk:
                    start_large(head, total)
                else:
                    try:
                        data = original_recv(chunk)
                    except BlockingIOError:
                        return codes.MQTT_ERR_AGAIN
                    except OSError as err:  # TimeoutError included
                        log.debug("mqtt receive failed: %s", err)
                        return codes.MQTT_ERR_CONN_LOST
                    if not data:
                        return codes.MQTT_ERR_CONN_LOST
                    buf.extend(data)
                    head, total = header()
                    if head > 0 and total - len(buf) > chunk:
                        start_large(head, total)
                    elif head == 0 or (head > 0 and len(buf) < total):
                        return codes.MQTT_ERR_AGAIN
            if head < 0:
                return codes.MQTT_ERR_PROTOCOL
        if large:
            rc = fill_large()
            if rc is not None:
                return rc
            command, remaining, packet, _ = large
            large.clear()
        else:
            command, remaining, packet = buf[0], list(buf[1:head]), _cut(buf, head, total)
            del buf[:total]
        paho._in_packet = {
            "command": command,
            "have_remaining": 1,
            "remaining_count": remaining,
            "remaining_mult": 1,
            "remaining_length": len(packet),
            "packet": packet,
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc = paho._packet_handle()
        except MalformedPacket as exc:
            log.debug("malformed packet from the broker: %s", exc)
            rc = codes.MQTT_ERR_PROTOCOL
        paho._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        with paho._msgtime_mutex:
            paho._last_bytes_received = mqtt.time_func()
        return rc

    def loop_read(max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = original_loop_read(max_packets)
        while rc == codes.MQTT_ERR_SUCCESS and paho._sock is not None and whole_packet_held():
            rc = original_loop_read(max_packets)
        if paho._sock is None:  # a new connection starts from a clean stream
            buf.clear()
            large.clear()
        return rc

    paho._packet_read = packet_read  # type: ignore[method-assign]
    paho.loop_read = loop_read  # type: ignore[method-assign]


#: Payloads above this many bytes are handed over as the bytearray they arrived in, not copied.
_LARGE_PAYLOAD = 64 * 1024


def _publish_fast_path(paho: mqtt.Client, deliver: Callable[[Message], None], pending: dict[int, Any]) -> None:
    """Decode PUBLISH (QoS 0/1) and PUBACK packets that carry no MQTT 5 properties (the usual
    case, and every packet of MQTT 3.1.1) without paho's general path.

    paho builds a Properties object per packet, walks its per-topic callback matcher, and
    aiomqtt then wraps each message again (validating its topic); a PUBACK walks every message
    in flight. Here a PUBLISH becomes one :class:`Message` handed to the session's inbox, and a
    PUBACK resolves its waiter and leaves paho's books as paho itself would. Anything else
    (properties present, QoS 2, a reason code, a topic that is not UTF-8) takes paho's own path.
    """
    original_publish = paho._handle_publish
    original_pubackcomp = paho._handle_pubackcomp
    success = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    v5 = paho._protocol == mqtt.MQTTv5

    def handle_publish() -> mqtt.MQTTErrorCode:
        header = paho._in_packet["command"]
        packet = paho._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if qos > 1 or len(packet) < 3:
            return original_publish()
        slen = (packet[0] << 8) | packet[1]
        start = 2 + slen + (2 if qos else 0)  # the properties (MQTT 5) or the payload
        if v5:
            if len(packet) <= start or packet[start] != 0:  # properties present (or malformed)
                return original_publish()
            start += 1
        elif len(packet) < start:
            return original_publish()
        try:
            topic = packet[2 : 2 + slen].decode()
        except UnicodeDecodeError:
            return original_publish()
        mid = (packet[start - 2 - v5] << 8) | packet[start - 1 - v5] if qos else 0
        payload: bytes | bytearray
        if len(packet) - start > _LARGE_PAYLOAD and type(packet) is bytearray:
            # The packet buffer is this message's alone: drop the header in place (the front of
            # a bytearray goes without a copy) and hand over the rest, a model chunk uncopied.
            del packet[:start]
            payload = packet
        else:
            with memoryview(packet) as view:
                payload = bytes(view[start:])
        deliver(Message(topic, payload, qos, bool(header & 0x01), mid))
        if qos == 1 and not paho._manual_ack:
            return paho._send_puback(mid)
        return success

    def handle_pubackcomp(cmd: Any) -> mqtt.MQTTErrorCode:
        packet = paho._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:  # a reason code or properties follow: paho decodes
            return original_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with paho._out_message_mutex:
            message = paho._out_messages.pop(mid, None)
            if message is None:
                return success
            waiter = pending.pop(mid, None)  # aiomqtt's waiters by message id: what its on_publish sets
            if waiter is not None:
                waiter.set()
            message.info._set_as_published()
            if message.qos > 0:
                paho._inflight_messages -= 1
                # Only messages queued behind the in-flight limit need paho's walk over them all.
                if paho._max_inflight_messages > 0 and len(paho._out_messages) > paho._inflight_messages:
                    return paho._update_inflight()
        return success

    paho._handle_publish = handle_publish  # type: ignore[method-assign]
    paho._handle_pubackcomp = handle_pubackcomp  # type: ignore[method-assign]


class _Sent:
    """A QoS 1 message sent and awaiting its PUBACK: paho's out-message record and the
    MQTTMessageInfo a publish returns, in one object without a lock or a condition variable."""

    __slots__ = ("_published", "mid", "rc")
    qos = 1
    state = mqtt.mqtt_ms_wait_for_puback
    dup = False

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self.rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        self._published = False

    @property
    def info(self) -> _Sent:
        return self

    def is_published(self) -> bool:
        return self._published

    def _set_as_published(self) -> None:
        self._published = True


def _lean_publish(paho: mqtt.Client) -> Callable[[str, bytes, int, bool], Any]:
    """paho's publish, for the common case done in a fraction of its time: a QoS 1 message with
    no properties, on a live connection, under the in-flight limit. The packet and the records
    paho keeps are exactly what paho's own publish makes; anything else goes to paho."""
    v5 = paho._protocol == mqtt.MQTTv5
    header = mqtt.PUBLISH | 0x02  # QoS 1

    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> Any:
        topic_bytes = topic.encode()
        if (
            qos != 1
            or paho._sock is None
            or not 0 < len(topic_bytes) <= 0xFFFF
            or b"+" in topic_bytes
            or b"#" in topic_bytes
            or not isinstance(payload, (bytes, bytearray))
            or (paho._max_inflight_messages and paho._inflight_messages >= paho._max_inflight_messages)
            or (paho._max_queued_messages and len(paho._out_messages) >= paho._max_queued_messages)
        ):
            return paho.publish(topic, payload, qos, retain)
        mid = paho._mid_generate()
        packet = bytearray((header | bool(retain),))
        # paho's own encoder, which also refuses a packet too large for MQTT (before any record).
        paho._pack_remaining_length(packet, 2 + len(topic_bytes) + 2 + v5 + len(payload))
        packet += len(topic_bytes).to_bytes(2, "big")
        packet += topic_bytes
        packet += mid.to_bytes(2, "big")
        if v5:
            packet.append(0)  # no properties
        packet += payload
        with paho._out_message_mutex:
            if mid in paho._out_messages:
                return paho.publish(topic, payload, qos, retain)
            sent = _Sent(mid)
            paho._out_messages[mid] = sent
            paho._inflight_messages += 1
        sent.rc = paho._packet_queue(mqtt.PUBLISH, packet, mid, 1, sent)  # type: ignore[arg-type]
        return sent

    return publish


def presence_factory(client_id: str, kind: str, **fields: object) -> PresenceFactory:
    """Birth / will payloads for a client; ``fields`` fill the optional Presence fields."""
    from edgewire import __version__

    def make(online: bool) -> env.Presence:
        return env.Presence(
            client_id=client_id, kind=kind, online=online, ts=time.time(), software=__version__, **fields
        )

    return make
