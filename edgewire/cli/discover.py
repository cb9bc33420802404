"""``edgewire discover``: brokers and devices on the link, by mDNS."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from edgewire.cli.common import fail, out
from edgewire.errors import EdgewireError


def discover(
    interface: Annotated[
        list[str], typer.Option("--interface", "-i", help="IPv4 address of an interface to query, or 'all'")
    ] = ["all"],  # noqa: B006
    timeout: Annotated[float, typer.Option(help="seconds to listen for answers")] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """List MQTT brokers (_mqtt._tcp) and edgewire devices (_edgewire._tcp) on the link, by mDNS."""
    from rich.table import Table

    from edgewire.mdns import EDGEWIRE_SERVICE, MQTT_SERVICE, browse

    async def run() -> tuple[list[Any], list[Any]]:
        brokers, devices = await asyncio.gather(
            browse(MQTT_SERVICE, timeout=timeout, interfaces=interface),
            browse(EDGEWIRE_SERVICE, timeout=timeout, interfaces=interface),
        )
        return brokers, devices

    try:
        brokers, devices = asyncio.run(run())
    except EdgewireError as exc:
        raise fail(exc) from None
    if as_json:
        doc = {
            "brokers": [{"name": b.instance, "host": b.host, "port": b.port, "txt": b.properties} for b in brokers],
            "devices": [{"name": d.instance, "host": d.host, "port": d.port, "txt": d.properties} for d in devices],
        }
        print(json.dumps(doc))
        return
    table = Table(title=f"mDNS on {', '.join(interface)}")
    for col in ("kind", "name", "address", "details"):
        table.add_column(col)
    for b in brokers:
        table.add_row("broker", b.instance, f"{b.host}:{b.port}", " ".join(f"{k}={v}" for k, v in b.properties.items()))
    for d in devices:
        table.add_row("device", d.instance, d.host, " ".join(f"{k}={v}" for k, v in d.properties.items()))
    out.print(table)
