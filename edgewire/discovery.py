"""Finding the broker: the configured one when it answers, else whatever mDNS offers.

A device with ``broker.url: auto`` (or ``discover: true``) calls :func:`find_broker` before
every connection attempt after a failure, so a broker that moved to another host or port is
found again without touching the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edgewire.config import BrokerSettings
from edgewire.errors import DiscoveryError
from edgewire.mdns import MQTT_SERVICE, Service, browse

log = logging.getLogger(__name__)


async def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


def pick(services: list[Service]) -> Service | None:
    """edgewire's own brokers first (TXT edgewire=1), then any MQTT broker; stable by name."""
    ours = [s for s in services if s.properties.get("edgewire") == "1"]
    chosen = ours or services
    return chosen[0] if chosen else None


async def find_broker(settings: BrokerSettings) -> tuple[str, int]:
    if settings.url != "auto":
        if await reachable(settings.host, settings.port) or not settings.discover:
            return settings.host, settings.port
    found = await browse(MQTT_SERVICE, timeout=settings.mdns_timeout_s, interfaces=settings.mdns_interfaces)
    service = pick(found)
    if service is None:
        raise DiscoveryError(f"no MQTT broker answered on mDNS ({MQTT_SERVICE}) within {settings.mdns_timeout_s}s")
    log.info("found broker %s at %s:%s by mDNS", service.instance, service.host, service.port)
    return service.host, service.port
