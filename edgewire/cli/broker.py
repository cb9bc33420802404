"""``edgewire broker``: the embedded MQTT broker as a service."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from edgewire.cli.budgets import (
    DEFAULT_DEVICE_READ_BURST,
    DEFAULT_DEVICE_READ_RATE,
    DeviceReadBurstOption,
    DeviceReadRateOption,
)
from edgewire.cli.common import console, fail, run_until_signal
from edgewire.errors import EdgewireError


def broker(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
    mdns: Annotated[bool, typer.Option("--mdns/--no-mdns", help="advertise _mqtt._tcp over mDNS")] = False,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="the fleet's broker passwords (from `edgewire flash`)")
    ] = None,
    roles: Annotated[
        Path | None, typer.Option("--roles", help="roles of the users that are not devices (from `edgewire flash`)")
    ] = None,
    allow_anonymous: Annotated[
        bool, typer.Option("--allow-anonymous", help="no logins at all: only for a lab on a trusted network")
    ] = False,
    certfile: Annotated[Path | None, typer.Option("--certfile", help="TLS: the broker's certificate")] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="TLS: the broker's key")] = None,
    cafile: Annotated[
        Path | None, typer.Option("--cafile", help="mutual TLS: the CA that signed the clients' certificates")
    ] = None,
    crlfile: Annotated[Path | None, typer.Option("--crlfile", help="mutual TLS: the fleet's revocation list")] = None,
    require_certificate: Annotated[
        bool,
        typer.Option("--require-certificate", help="mutual TLS: a client certificate is required; its CN is the login"),
    ] = False,
    device_read_rate: DeviceReadRateOption = DEFAULT_DEVICE_READ_RATE,
    device_read_burst: DeviceReadBurstOption = DEFAULT_DEVICE_READ_BURST,
) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) until interrupted. Logins need the
    fleet's password file, or with --require-certificate the fleet's client certificates,
    unless --allow-anonymous is given. All TLS files come from `edgewire flash --broker-out`."""
    from edgewire.broker.embedded import BrokerAuth, BrokerTls, EmbeddedBroker
    from edgewire.broker.pacing import ReadBudget

    stop = asyncio.Event()
    if (certfile is None) != (keyfile is None):
        raise fail(ValueError("TLS needs both --certfile and --keyfile"))
    tls = None
    if certfile is not None and keyfile is not None:
        tls = BrokerTls(certfile, keyfile, cafile, crlfile, require_certificate)
    elif cafile or crlfile or require_certificate:
        raise fail(ValueError("--cafile, --crlfile and --require-certificate need --certfile and --keyfile"))
    logins = password_file is not None or require_certificate
    auth = BrokerAuth(password_file, roles) if logins else None
    if auth is None and not allow_anonymous:
        raise fail(
            ValueError(
                "give --password-file or --require-certificate (files from `edgewire flash --broker-out`) "
                "or --allow-anonymous"
            )
        )

    async def serve() -> None:
        from edgewire import sdnotify

        budget = ReadBudget(device_read_rate, device_read_burst)
        async with EmbeddedBroker(
            host, port, mdns=mdns, auth=auth, allow_anonymous=allow_anonymous, tls=tls, read_budget=budget
        ) as b:
            console.print(f"broker listening on {b.url}" + (" (advertised on mDNS)" if mdns else ""))
            sdnotify.notify(f"READY=1\nSTATUS=listening on {b.url}")
            pings = asyncio.create_task(sdnotify.watchdog())
            await stop.wait()
            pings.cancel()

    try:
        run_until_signal(serve, stop.set)
    except EdgewireError as exc:
        raise fail(exc) from None
