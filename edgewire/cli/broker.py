"""``edgewire broker``: the embedded MQTT broker as a service."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from edgewire.cli.common import console, fail, run_until_signal
from edgewire.errors import EdgewireError


def broker(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    mdns: Annotated[bool, typer.Option("--mdns/--no-mdns", help="advertise _mqtt._tcp over mDNS")] = False,
) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) until interrupted."""
    from edgewire.broker.embedded import EmbeddedBroker

    stop = asyncio.Event()

    async def serve() -> None:
        from edgewire import sdnotify

        async with EmbeddedBroker(host, port, mdns=mdns) as b:
            console.print(f"broker listening on {b.url}" + (" (advertised on mDNS)" if mdns else ""))
            sdnotify.notify(f"READY=1\nSTATUS=listening on {b.url}")
            pings = asyncio.create_task(sdnotify.watchdog())
            await stop.wait()
            pings.cancel()

    try:
        run_until_signal(serve, stop.set)
    except EdgewireError as exc:
        raise fail(exc) from None
