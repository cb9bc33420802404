"""The MQTT fast path: every use of paho-mqtt's and aiomqtt's private internals, behind one fence.

The session's throughput rests on a few patches to one aiomqtt client's paho client: writes
gathered into one send, reads taken in large chunks, the common PUBLISH and PUBACK decoded
without paho's general path, a lean QoS 1 publish, a QoS 0 publish written at once when nothing
waits ahead of it, and acknowledgement waits that cost one future each. They reach into private
names that change between releases, so :func:`install` applies them only to the paho-mqtt and
aiomqtt minor versions they were tested against, and not at all when
``EDGEWIRE_MQTT_FASTPATH=0``; otherwise it returns None and the session runs on aiomqtt's public
API alone, which must behave the same (tests/test_session_paths.py runs the same traffic
through both).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import re
import socket
from collections.abc import Callable
from importlib import metadata
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttCodeError
from paho.mqtt import client as mqtt
from paho.mqtt.exception import MalformedPacket

log = logging.getLogger(__name__)

#: Switches the fast path off when set to "0" (read at every connect).
ENV_SWITCH = "EDGEWIRE_MQTT_FASTPATH"

#: The releases the patches were written and tested against: [first, past-the-end) minor versions.
#: Keep in step with the pins in pyproject.toml.
TESTED_VERSIONS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "paho-mqtt": ((2, 1), (2, 3)),
    "aiomqtt": ((2, 3), (2, 6)),
}

#: What the fast path hands each received message to: (topic, payload, qos, retain, message id).
#: Called from whichever thread paho reads on; the receiver hands it to its own loop.
Deliver = Callable[[str, bytes | bytearray, int, bool, int], None]


def install(client: aiomqtt.Client, deliver: Deliver) -> FastPath | None:
    """Put the fast path on ``client`` (before it connects) and return its publisher, or None
    when it is switched off or the installed libraries are outside the tested versions: then
    ``client`` is left untouched and must be used through aiomqtt's public API only."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        _log_once(f"MQTT fast path off ({ENV_SWITCH}=0): publishing and receiving through aiomqtt")
        return None
    refusal = _version_refusal()
    if refusal is not None:
        _log_once(f"MQTT fast path off: {refusal}; publishing and receiving through aiomqtt")
        return None
    return FastPath(client, deliver)


class FastPath:
    """The patches on one client, and its publisher: :meth:`send` hands a message to paho and
    returns the wait for its acknowledgement, without aiomqtt's per-message Event and task."""

    def __init__(self, client: aiomqtt.Client, deliver: Deliver) -> None:
        paho = client._client
        self._acks = _Acks(client, asyncio.get_running_loop())
        _coalesce_writes(paho)
        _buffer_reads(paho)
        _publish_fast_path(paho, deliver, client._pending_publishes)
        self._publish = _lean_publish(paho)

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Future[None] | None:
        """Hand one message to paho: None when it is out already (QoS 0 written at once), else a
        future that completes when the broker has it (QoS 0: when written) and fails with
        aiomqtt.MqttError on timeout or when :meth:`fail_all` ends it. MqttCodeError when paho
        refuses the message (no connection, too large)."""
        info = self._publish(topic, payload, qos, retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise MqttCodeError(info.rc, "Could not publish message")
        if info.is_published():
            return None
        return self._acks.register(info.mid)

    def fail_all(self) -> None:
        """The connection is gone: every wait ends now (this client is never reused, so no
        acknowledgement can come), not after the client's timeout."""
        self._acks.fail_all()


@functools.cache
def _version_refusal() -> str | None:
    """Why the installed libraries are not the tested ones, or None when they are."""
    for dist, (first, past) in TESTED_VERSIONS.items():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            return f"{dist} is not installed as a distribution"
        found = re.match(r"(\d+)\.(\d+)", version)
        minor = (int(found[1]), int(found[2])) if found else None
        if minor is None or not first <= minor < past:
            return f"{dist} {version} is outside the tested {_dotted(first)} to <{_dotted(past)}"
    return None


def _dotted(minor: tuple[int, int]) -> str:
    return f"{minor[0]}.{minor[1]}"


_logged: set[str] = set()


def _log_once(line: str) -> None:
    """One line per reason per process, not one per reconnect."""
    if line not in _logged:
        _logged.add(line)
        log.info("%s", line)


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


def _publish_fast_path(paho: mqtt.Client, deliver: Deliver, pending: dict[int, Any]) -> None:
    """Decode PUBLISH (QoS 0/1) and PUBACK packets that carry no MQTT 5 properties (the usual
    case, and every packet of MQTT 3.1.1) without paho's general path.

    paho builds a Properties object per packet, walks its per-topic callback matcher, and
    aiomqtt then wraps each message again (validating its topic); a PUBACK walks every message
    in flight. Here a PUBLISH goes straight to ``deliver`` (the session's inbox), and a
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
        deliver(topic, payload, qos, bool(header & 0x01), mid)
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
    MQTTMessageInfo a publish returns, in one object without a lock or a condition variable.
    A QoS 0 message uses it as its MQTTMessageInfo alone (paho keeps no record of one)."""

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
    """paho's publish, for the common cases done in a fraction of its time: a message with no
    properties, on a live connection, and for QoS 1 under the in-flight limit. The packet and
    the records paho keeps are exactly what paho's own publish makes; anything else goes to
    paho.

    A QoS 0 message with nothing queued ahead of it is written to a plain TCP socket at once:
    through paho it would wake the event loop (a byte on paho's socket pair, a writer added from
    another thread's callback, a pass of the loop) only to make the same send a moment later."""
    v5 = paho._protocol == mqtt.MQTTv5

    def packet_of(topic_bytes: bytes, payload: bytes | bytearray, retain: bool, mid: int | None) -> bytearray:
        """The PUBLISH packet paho would make: QoS 1 with message id ``mid``, QoS 0 without one."""
        packet = bytearray((mqtt.PUBLISH | (0x02 if mid is not None else 0) | bool(retain),))
        ident = 2 if mid is not None else 0
        # paho's own encoder, which also refuses a packet too large for MQTT (before any record).
        paho._pack_remaining_length(packet, 2 + len(topic_bytes) + ident + v5 + len(payload))
        packet += len(topic_bytes).to_bytes(2, "big")
        packet += topic_bytes
        if mid is not None:
            packet += mid.to_bytes(2, "big")
        if v5:
            packet.append(0)  # no properties
        packet += payload
        return packet

    def publish(topic: str, payload: bytes, qos: int, retain: bool) -> Any:
        topic_bytes = topic.encode()
        if (
            qos > 1
            or paho._sock is None
            or not 0 < len(topic_bytes) <= 0xFFFF
            or b"+" in topic_bytes
            or b"#" in topic_bytes
            or not isinstance(payload, (bytes, bytearray))
        ):
            return paho.publish(topic, payload, qos, retain)
        if qos == 0:
            return publish_qos0(topic, topic_bytes, payload, retain)
        if (paho._max_inflight_messages and paho._inflight_messages >= paho._max_inflight_messages) or (
            paho._max_queued_messages and len(paho._out_messages) >= paho._max_queued_messages
        ):
            return paho.publish(topic, payload, qos, retain)
        mid = paho._mid_generate()
        packet = packet_of(topic_bytes, payload, retain, mid)
        with paho._out_message_mutex:
            if mid in paho._out_messages:
                return paho.publish(topic, payload, qos, retain)
            sent = _Sent(mid)
            paho._out_messages[mid] = sent
            paho._inflight_messages += 1
        sent.rc = paho._packet_queue(mqtt.PUBLISH, packet, mid, 1, sent)  # type: ignore[arg-type]
        return sent

    def publish_qos0(topic: str, topic_bytes: bytes, payload: bytes | bytearray, retain: bool) -> Any:
        sock = paho._sock
        if paho._out_packet or type(sock) is not socket.socket:
            return paho.publish(topic, payload, 0, retain)  # behind queued packets, or TLS
        packet = packet_of(topic_bytes, payload, retain, None)
        sent = _Sent(paho._mid_generate())  # paho numbers QoS 0 messages too (its on_publish)
        try:
            written = sock.send(packet)
        except OSError:  # full (BlockingIOError), or a lost link that paho's own write then reports
            written = 0
        if written:
            with paho._msgtime_mutex:
                paho._last_msg_out = mqtt.time_func()
        if written == len(packet):
            sent._published = True
            return sent
        # The rest waits its turn in paho's queue; paho reports it published once written.
        rest = packet[written:] if written else packet
        sent.rc = paho._packet_queue(mqtt.PUBLISH, rest, sent.mid, 0, sent)  # type: ignore[arg-type]
        return sent

    return publish
