"""systemd's notify protocol, spoken directly (one datagram) so no extra package is needed.

A unit with Type=notify is 'started' only when the agent says READY=1 (after it has connected,
or given up waiting for the broker), and WatchdogSec restarts it when the pings stop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable


def notify(state: str) -> bool:
    """Send one state line (READY=1, WATCHDOG=1, STATUS=..., STOPPING=1); False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, as systemd recommends; None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def watchdog(healthy: Callable[[], bool] = lambda: True) -> None:
    """Ping the watchdog while ``healthy()`` holds; stop pinging when it does not."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
