"""How a device reaches its broker (a fixed address, or one found over mDNS) and how operators
find the device on its LAN (its own ``_edgewire._tcp`` record)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from edgewire import envelopes as env
from edgewire.config import DeviceConfig
from edgewire.metrics import Meter
from edgewire.session import MqttSession


def device_session(config: DeviceConfig, presence: Callable[[bool], env.Presence], meter: Meter) -> MqttSession:
    broker = config.broker
    resolver = None
    if broker.uses_mdns:
        from edgewire.discovery import find_broker

        async def resolver() -> tuple[str, int]:
            return await find_broker(broker)

    return MqttSession.from_settings(
        config.device_id,
        broker,
        host=broker.host if broker.url != "auto" else "",
        resolver=resolver,
        presence=presence,
        meter=meter,
        persistent=broker.persistent_session,
        session_expiry_s=broker.session_expiry_s,
    )


def advertisement(
    config: DeviceConfig, *, profile: str, models: str, mode: str
) -> contextlib.AbstractAsyncContextManager[Any]:
    """The device's mDNS record while it runs; nothing when it is not to be advertised."""
    if config.advertise is None:
        return contextlib.nullcontext()
    from edgewire.mdns import EDGEWIRE_SERVICE, Advertiser

    txt = {"device_id": config.device_id, "fleet": config.fleet, "profile": profile, "models": models, "state": mode}
    return Advertiser(
        EDGEWIRE_SERVICE, config.device_id, config.advertise.port, addresses=[config.advertise.address], properties=txt
    )
