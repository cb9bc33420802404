"""What publishes on one connection of a session: the fast path, or aiomqtt's public API.

edgewire.mqtt_fastpath's ``FastPath`` is the sender wherever it installs itself; elsewhere
(``EDGEWIRE_MQTT_FASTPATH=0``, or other releases of paho-mqtt and aiomqtt) :class:`AiomqttSender`
is, and the session behaves the same on either (tests/test_session_paths.py runs both).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import aiomqtt


class Sender(Protocol):
    """What publishes on one connection: mqtt_fastpath.FastPath, or :class:`AiomqttSender`."""

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Future[None] | None:
        """Queue one message; None when it is out already, else a future settled by the broker's
        acknowledgement (aiomqtt.MqttError when it does not come)."""
        ...

    def fail_all(self) -> None:
        """The connection is gone: fail every wait now."""
        ...


class AiomqttSender:
    """Publishing through aiomqtt's public ``Client.publish``, for when the fast path is off.

    One task per message (aiomqtt's publish is a coroutine), each behind a future the session
    waits on, so a dropped link fails the waits at once as the fast path does, instead of each
    waiting out the client's timeout."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._running: set[asyncio.Task[None]] = set()

    def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._client.publish(topic, payload, qos=qos, retain=retain))
        self._running.add(task)

        def settle(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            if outcome.done():
                return
            if task.cancelled():
                outcome.set_exception(aiomqtt.MqttError("Disconnected before the broker acknowledged"))
            elif (exc := task.exception()) is not None:
                outcome.set_exception(exc)
            else:
                outcome.set_result(None)

        task.add_done_callback(settle)
        return outcome

    def fail_all(self) -> None:
        for task in list(self._running):
            task.cancel()
