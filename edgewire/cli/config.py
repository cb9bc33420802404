"""``edgewire config``: desired configuration over the air, and what devices report."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any

import typer

from edgewire.cli.common import broker_settings, fail, operator_session, out
from edgewire.config import BrokerSettings
from edgewire.errors import EdgewireError

config_app = typer.Typer(help="Desired configuration over the air, and what devices report.", no_args_is_help=True)


async def _retained(broker: BrokerSettings, topic_names: list[str], wait_s: float = 1.5) -> dict[str, bytes]:
    """The retained message on each topic (absent when none arrives within ``wait_s``)."""
    found: dict[str, bytes] = {}
    async with operator_session(broker, "config") as s:
        await s.wait_connected(10)
        for name in topic_names:
            await s.subscribe(name, qos=1)

        async def collect() -> None:
            async for msg in s.messages():
                found[str(msg.topic)] = bytes(msg.payload)
                if len(found) == len(topic_names):
                    return

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collect(), wait_s)
    return found


def _target_topics(device: str | None, fleet: str | None) -> tuple[str, str | None]:
    from edgewire import topics

    if (device is None) == (fleet is None):
        raise fail(ValueError("give exactly one of --device or --fleet"))
    if fleet is not None:
        return topics.CONFIG_FLEET.build(fleet=fleet), None
    assert device is not None
    return topics.CONFIG_DESIRED.build(device_id=device), topics.CONFIG_REPORTED.build(device_id=device)


@config_app.command("set")
def config_set(
    settings: Annotated[list[str], typer.Argument(help="dotted.key=value, e.g. judge.min_confidence=0.6")],
    device: Annotated[str | None, typer.Option(help="one device")] = None,
    fleet: Annotated[str | None, typer.Option(help="every device of a fleet")] = None,
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
) -> None:
    """Merge settings into the retained desired configuration and bump its revision."""
    import time

    import yaml

    from edgewire import envelopes
    from edgewire.config import deep_merge

    broker = broker_settings(broker_url)
    desired_topic, _ = _target_topics(device, fleet)
    updates: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise fail(ValueError(f"{item!r}: expected dotted.key=value"))
        node = updates
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)

    async def run() -> Any:
        current = (await _retained(broker, [desired_topic])).get(desired_topic)
        doc = envelopes.decode(envelopes.DesiredConfig, current) if current else None
        config = deep_merge(doc.config if doc else {}, updates)
        new = envelopes.DesiredConfig(revision=(doc.revision if doc else 0) + 1, config=config, ts=time.time())
        async with operator_session(broker, "config") as s:
            await s.wait_connected(10)
            await s.publish(desired_topic, envelopes.encode(new), qos=1, retain=True, timeout=10)
        return new

    try:
        new = asyncio.run(run())
    except EdgewireError as exc:
        raise fail(exc) from None
    out.print(f"{desired_topic} revision {new.revision}: {json.dumps(new.config)}", highlight=False)


@config_app.command("get")
def config_get(
    device: Annotated[str | None, typer.Option(help="one device")] = None,
    fleet: Annotated[str | None, typer.Option(help="a fleet's desired configuration")] = None,
    broker_url: Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
) -> None:
    """Print the desired configuration and, for a device, what it reported."""
    from edgewire import envelopes

    broker = broker_settings(broker_url)
    desired_topic, reported_topic = _target_topics(device, fleet)
    names = [desired_topic] + ([reported_topic] if reported_topic else [])
    try:
        found = asyncio.run(_retained(broker, names))
    except EdgewireError as exc:
        raise fail(exc) from None
    doc: dict[str, Any] = {}
    if desired_topic in found:
        doc["desired"] = envelopes.decode(envelopes.DesiredConfig, found[desired_topic]).model_dump(mode="json")
    if reported_topic and reported_topic in found:
        doc["reported"] = envelopes.decode(envelopes.ReportedConfig, found[reported_topic]).model_dump(mode="json")
    print(json.dumps(doc))
