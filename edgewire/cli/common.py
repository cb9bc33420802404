"""What every command shares: the two consoles, the error exit, the signal-aware event loop and
the broker options."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.markup import escape

from edgewire.aio import settle_heap
from edgewire.config import BrokerSettings
from edgewire.session import MqttSession

# Progress and errors on stderr; results (tables, JSON) on stdout, so they can be piped.
console = Console(stderr=True)
out = Console()

BrokerOption = Annotated[
    str, typer.Option("--broker", help="mqtt://HOST:PORT or mqtts://[USER@]HOST:PORT (login: $EDGEWIRE_MQTT_*)")
]
HistoryOption = Annotated[
    Path | None,
    typer.Option("--history", help="push history (default $EDGEWIRE_HOME/models, ~/.local/share/edgewire/models)"),
]


def fail(exc: Exception) -> typer.Exit:
    """Print ``exc`` as an operator-facing error and return the exit (status 2) to raise."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    return typer.Exit(2)


def run_until_signal(coro_factory: Any, on_signal: Any) -> Any:
    """Run a long-lived service, turning SIGINT/SIGTERM into its own graceful stop."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await coro_factory()

    settle_heap()
    return asyncio.run(main())


#: Where a command finds its broker login and TLS files: the environment (or a file it names),
#: never the command line alone, whose arguments any local user can read in the process list.
CREDENTIAL_ENV = {
    "username": "EDGEWIRE_MQTT_USERNAME",
    "password": "EDGEWIRE_MQTT_PASSWORD",
    "ca_file": "EDGEWIRE_MQTT_CA_FILE",
    "cert_file": "EDGEWIRE_MQTT_CERT_FILE",
    "key_file": "EDGEWIRE_MQTT_KEY_FILE",
}
PASSWORD_FILE_ENV = "EDGEWIRE_MQTT_PASSWORD_FILE"


def broker_settings(url: str) -> BrokerSettings:
    """A broker URL checked up front, so a typo fails before anything starts; the login and
    TLS files come from CREDENTIAL_ENV (the password also from the file PASSWORD_FILE_ENV
    names). A username in the URL (mqtt://user@host) is taken; a password in it is refused."""
    try:
        parts = urlsplit(url)
        fields: dict[str, Any] = {k: os.environ[v] for k, v in CREDENTIAL_ENV.items() if os.environ.get(v)}
        if PASSWORD_FILE_ENV in os.environ and "password" not in fields:
            fields["password"] = Path(os.environ[PASSWORD_FILE_ENV]).read_text(encoding="utf-8").strip()
        if parts.password is not None:
            raise ValueError(f"put the password in ${CREDENTIAL_ENV['password']} or ${PASSWORD_FILE_ENV}, not the url")
        if parts.username is not None:
            fields["username"] = unquote(parts.username)
            url = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
        return BrokerSettings(url=url, **fields)
    except Exception as exc:
        raise fail(exc) from None


def tool_client_id(broker: BrokerSettings, tool: str) -> str:
    """A client id of this one run of ``tool``: the login's username, the tool and a random
    suffix (``alice-watch-3f9a0c1e``), which the identity rule lets operators and monitors use
    (edgewire.acl.identity_ok), so two tools of one user running at once never share an id and
    knock each other off. Without a login (a lab broker open to anonymous clients): the host,
    the tool and the suffix. Mosquitto with ``use_username_as_clientid`` replaces any client id
    by the username: there each tool run at the same time needs a username of its own (SECURITY.md)."""
    suffix = f"{tool}-{secrets.token_hex(4)}"
    return f"{broker.username}-{suffix}" if broker.username else f"{socket.gethostname()[:20]}-{suffix}"


def operator_session(broker: BrokerSettings, tool: str) -> MqttSession:
    """A short-lived session of ``tool`` with a client id of its own (see tool_client_id)."""
    return MqttSession.from_settings(tool_client_id(broker, tool), broker)
