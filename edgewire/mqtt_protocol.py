"""MQTT 5 or 3.1.1: which one a broker speaks, and how a CONNECT asks for a persistent session
in each.

A session speaks MQTT 5 where the broker does and falls back to 3.1.1 where it does not (amqtt
refuses an MQTT 5 CONNECT). The two spell a persistent session differently: 3.1.1 clears
``clean_session``; 5 clears ``clean_start`` and must give the session an expiry, or the broker
forgets it at the disconnect.
"""

from __future__ import annotations

import secrets
import ssl
from typing import Any, Literal

import aiomqtt
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MqttVersion = Literal["auto", "5", "3.1.1"]

#: CONNACK codes that refuse the protocol version: 1 in MQTT 3.1.1, 0x84 in MQTT 5.
_PROTOCOL_REFUSALS = frozenset({1, 0x84})


async def negotiate(host: str, port: int, client_id: str, tls: ssl.SSLContext | None) -> MqttVersion:
    """Ask the broker with a bare MQTT 5 CONNECT; a refusal of the protocol means 3.1.1.

    The probe carries no will and no credentials on purpose: amqtt misparses an MQTT 5
    CONNECT with either and leaves it hanging instead of refusing it, while a bare one is
    refused at once. A broker that answers the bare probe in MQTT 5 with any other refusal
    (not authorized: anonymous logins are off) speaks MQTT 5; the real login follows.
    """
    probe = aiomqtt.Client(
        host,
        port,
        identifier=f"{client_id[:40]}-probe-{secrets.token_hex(3)}",
        protocol=ProtocolVersion.V5,
        timeout=10,
        tls_context=tls,
    )
    try:
        async with probe:
            return "5"
    except MqttConnectError as exc:
        return "3.1.1" if _refuses_protocol(exc) else "5"


def session_options(protocol: ProtocolVersion, *, persistent: bool, session_expiry_s: int) -> dict[str, Any]:
    """aiomqtt.Client's arguments for a clean or a persistent session in ``protocol``; a
    persistent one keeps the client's subscriptions and queued QoS 1 messages at the broker
    while it is away."""
    if protocol == ProtocolVersion.V5:
        if not persistent:
            return {"clean_start": True}
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        return {"clean_start": False, "properties": props}
    return {"clean_session": not persistent}


def _refuses_protocol(exc: MqttConnectError) -> bool:
    rc = exc.rc
    value = getattr(rc, "value", rc)
    return value is None or value in _PROTOCOL_REFUSALS
