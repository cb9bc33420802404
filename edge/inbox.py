"""What arrives on a device's subscriptions, each message handed to the part that owns it.

A device subscribes to its input frames (an MQTT source), the cloud's answers, its desired
configuration and its model's announces and chunks. :class:`Inbox` names those subscriptions
and routes each message by its topic. Whatever a message holds, it costs that message only: a
malformed one, or one a handler fails on, is counted and logged, and the receive loop goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from edgewire import envelopes as env
from edgewire import topics
from edgewire.config import DeviceConfig
from edgewire.errors import DecodeError, TopicError
from edgewire.metrics import Meter
from edgewire.session import MqttSession

from .escalation import Escalations
from .model_updater import ModelUpdater
from .remote_config import RemoteConfig
from .sources import QueueSource, Source

log = logging.getLogger(__name__)


class Inbox:
    """A device's subscriptions and the routing of what comes in on them. ``config`` reads the
    configuration running now; ``reconfigure`` applies a desired one that was accepted."""

    def __init__(
        self,
        device_id: str,
        meter: Meter,
        *,
        source: Source,
        escalations: Escalations | None,
        remote_config: RemoteConfig,
        updater: ModelUpdater | None,
        config: Callable[[], DeviceConfig],
        reconfigure: Callable[[DeviceConfig], None],
    ) -> None:
        self.device_id = device_id
        self.meter = meter
        self.source = source
        self.escalations = escalations
        self.remote_config = remote_config
        self.updater = updater
        self._config = config
        self._reconfigure = reconfigure
        self._input_topic = topics.INPUT.build(device_id=device_id)
        #: The session messages come in on (set by :meth:`listen`); config reports go out on it.
        self.session: MqttSession | None = None

    def subscriptions(self) -> list[tuple[str, int]]:
        """Every (topic filter, QoS) the device subscribes to."""
        subscriptions = self.remote_config.subscriptions()
        if isinstance(self.source, QueueSource):
            subscriptions.append((self._input_topic, topics.INPUT.qos))
        if self.escalations is not None:
            subscriptions += self.escalations.subscriptions()
        if self.updater is not None:
            subscriptions += self.updater.subscriptions()
        return subscriptions

    async def listen(self, session: MqttSession) -> None:
        self.session = session
        async for message in session.messages():
            await self.receive(str(message.topic), message.payload)

    async def receive(self, topic: str, payload: Any) -> None:
        """One message in; whatever it holds, it is counted and the receive loop goes on."""
        try:
            await self._dispatch(topic, payload)
        except (DecodeError, TopicError) as exc:
            reason = "topic" if isinstance(exc, TopicError) else "payload"
            self.meter.inc("messages_rejected_total", reason=reason)
            log.warning("%s: rejected message on %s: %s", self.device_id, topic, exc)
        except Exception:  # a bug must cost one message, not the device's receive loop
            self.meter.inc("messages_rejected_total", reason="internal")
            log.exception("%s: handling a message on %s failed", self.device_id, topic)

    async def _dispatch(self, topic: str, payload: Any) -> None:
        parsed = topics.parse(topic)
        data = payload if isinstance(payload, bytes | bytearray) else b""
        if parsed.spec is topics.INPUT and isinstance(self.source, QueueSource):
            frame = env.decode(env.Frame, data)
            if not self.source.offer(frame.frame_id, frame.data, frame.ts, frame.content_type):
                self.meter.inc("frames_dropped_total", reason="backlog")
            return
        if parsed.spec is topics.RESULT and self.escalations is not None:
            self.escalations.receive(env.decode(env.Result, data), topic)
            return
        if parsed.spec in (topics.CONFIG_DESIRED, topics.CONFIG_FLEET) and self.remote_config.wants(topic):
            outcome = await self.remote_config.receive(topic, data, self._config())
            if outcome is not None:
                if outcome.status != "rejected":
                    self._reconfigure(outcome.config)
                assert self.session is not None
                await self.remote_config.report(self.session, outcome)
            return
        if self.updater is not None and self.updater.wants(parsed):
            await self.updater.handle(parsed, data)
            return
        # An edgewire topic this device never asked for: amqtt hands every new client the retained
        # messages of every filter any client subscribed to. Not an attack, not worth a warning.
        self.meter.inc("messages_ignored_total", family=parsed.spec.name)
        log.debug("%s: ignored a message on %s", self.device_id, topic)
