"""What every command shares: the two consoles, the error exit, the signal-aware event loop and
the broker options."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from edgewire.aio import settle_heap
from edgewire.config import BrokerSettings
from edgewire.ports import free_port
from edgewire.session import MqttSession

# Progress and errors on stderr; results (tables, JSON) on stdout, so they can be piped.
console = Console(stderr=True)
out = Console()

BrokerOption = Annotated[str, typer.Option("--broker", help="mqtt://HOST:PORT")]
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


def broker_settings(url: str) -> BrokerSettings:
    """A broker URL checked up front, so a typo fails before anything starts."""
    try:
        return BrokerSettings(url=url)
    except Exception as exc:
        raise fail(exc) from None


def operator_session(broker: BrokerSettings) -> MqttSession:
    """A short-lived session with a unique client id, so two operators never kick each other off."""
    return MqttSession.from_settings(f"operator-{free_port()}", broker)
