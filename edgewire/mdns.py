"""mDNS/DNS-SD so a fleet finds its broker and its devices without a hand-kept list of IP addresses.

A broker host advertises ``_mqtt._tcp``; every edgewire device advertises ``_edgewire._tcp`` with
its identity in the TXT record. Both sides use zeroconf's asyncio API on the caller's event loop.

Where the multicast goes is never left to a default. zeroconf's own default
(``InterfaceChoice.All``) joins the mDNS group and sends on every IPv4 interface the machine has:
on a Jetson that may be the plant network, a VPN and a docker bridge at once. So here:

* an :class:`Advertiser` sends only on the interfaces that hold the addresses it advertises,
  unless given ``interfaces``;
* :func:`browse` has no default at all: the caller names the interface addresses to query.

``interfaces`` is a list of IPv4 addresses, one per interface (the interface is the one holding
the address), or exactly ``["all"]`` to opt in to every IPv4 interface. Loopback works like any
other interface: ``["127.0.0.1"]`` sends and listens on ``lo`` only (the kernel routes multicast
by ``IP_MULTICAST_IF``, so ``lo`` needs neither the MULTICAST flag nor a multicast route), which
is what the tests use inside a private network namespace. Only IPv4 is spoken.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from types import TracebackType

from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    InterfacesType,
    IPVersion,
    NonUniqueNameException,
    NotRunningException,
    ServiceStateChange,
    Zeroconf,
    service_type_name,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edgewire.errors import DiscoveryError

__all__ = [
    "ALL_INTERFACES",
    "EDGEWIRE_SERVICE",
    "MQTT_SERVICE",
    "Advertiser",
    "Service",
    "browse",
]

log = logging.getLogger(__name__)

MQTT_SERVICE = "_mqtt._tcp.local."
EDGEWIRE_SERVICE = "_edgewire._tcp.local."

# The one spelling that opts in to zeroconf's InterfaceChoice.All; it must be asked for.
ALL_INTERFACES = "all"

_MAX_LABEL_BYTES = 63  # RFC 1035 limit on one DNS label, the instance name included
_INTERFACES_HELP = (
    "pass interfaces=[...] with the IPv4 address of each interface to use (see `ip -4 addr`), "
    f'or ["{ALL_INTERFACES}"] to use every IPv4 interface'
)


@dataclass(frozen=True)
class Service:
    """One resolved service instance.

    ``name`` is the full mDNS name (``<instance>.<type>``), unique on the link, so it is what
    results are deduplicated and sorted by. ``host`` is the first IPv4 address the instance
    advertised. TXT keys without a value come back as ``""``.
    """

    type: str
    name: str
    host: str
    port: int
    # A dict is unhashable; leaving it out of the hash keeps Service usable in sets.
    properties: dict[str, str] = field(hash=False)

    @property
    def instance(self) -> str:
        """The instance label alone, as it was given to :class:`Advertiser`."""
        suffix = "." + self.type
        if self.name.lower().endswith(suffix.lower()):
            return self.name[: -len(suffix)]
        return self.name


class Advertiser:
    """Advertise one service instance for as long as the ``async with`` block runs.

    Entering probes the name (RFC 6762 §8, about a second) and announces; it fails with
    :class:`DiscoveryError` if another responder already owns the name, so two devices never
    silently shadow each other. Leaving sends goodbye packets, so browsers drop the instance at
    once instead of when its TTL runs out.
    """

    def __init__(
        self,
        service_type: str,
        instance: str,
        port: int,
        *,
        addresses: list[str],
        properties: dict[str, str] | None = None,
        interfaces: list[str] | None = None,
    ) -> None:
        _check_service_type(service_type)
        if not instance or len(instance.encode()) > _MAX_LABEL_BYTES:
            raise DiscoveryError(
                f"mDNS instance name {instance!r} must be 1 to {_MAX_LABEL_BYTES} bytes of UTF-8; "
                "use a short, unique name such as the device_id"
            )
        if not 0 < port < 65536:
            raise DiscoveryError(f"port {port} for {instance!r} is not a TCP/UDP port (1-65535)")
        if not addresses:
            raise DiscoveryError(
                f"Advertiser {instance!r} needs addresses=[...]: the IPv4 address(es) clients should connect to"
            )
        self.service_type = service_type
        self.instance = instance
        self.port = port
        self.name = f"{instance}.{service_type}"
        self._addresses = [_ipv4(a, "address") for a in addresses]
        self._interfaces = _interface_choice(interfaces if interfaces is not None else self._addresses)
        self._properties = dict(properties or {})
        self._info = self._service_info(self._properties)
        self._aiozc: AsyncZeroconf | None = None
        self._announcing: asyncio.Future[None] | None = None

    @property
    def properties(self) -> dict[str, str]:
        """The TXT record currently advertised (a copy)."""
        return dict(self._properties)

    async def __aenter__(self) -> Advertiser:
        if self._aiozc is not None:
            raise DiscoveryError(f"{self.name} is already being advertised by this Advertiser")
        aiozc = await _open(self._interfaces)
        try:
            announced = await aiozc.async_register_service(self._info)
        except NonUniqueNameException as exc:
            await aiozc.async_close()
            raise DiscoveryError(
                f"{self.name} is already advertised by another responder on the link; "
                "give each process a unique instance name (e.g. its device_id)"
            ) from exc
        except BaseException:
            await aiozc.async_close()
            raise
        self._aiozc = aiozc
        self._announcing = _as_future(announced)
        log.debug("advertising %s on %s:%d", self.name, self._addresses, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        try:
            # A pending re-announcement must not go out after the goodbye and resurrect the name.
            await self._stop_announcing()
            goodbye = await aiozc.async_unregister_service(self._info)
            await goodbye
            log.debug("withdrew %s", self.name)
        finally:
            await aiozc.async_close()

    async def update(self, properties: dict[str, str]) -> None:
        """Replace the whole TXT record and re-announce it.

        Browsers holding the old record replace it (the TXT record carries the cache-flush bit);
        a fresh :func:`browse` sees the new one as soon as this returns.
        """
        if self._aiozc is None:
            raise DiscoveryError(f"update() of {self.name} needs a running Advertiser: use `async with`")
        info = self._service_info(properties)
        await self._stop_announcing()
        announced = await self._aiozc.async_update_service(info)
        self._info = info
        self._properties = dict(properties)
        self._announcing = _as_future(announced)

    def _service_info(self, properties: dict[str, str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self.service_type,
            self.name,
            port=self.port,
            # zeroconf's own choice at register time, made explicit because update() needs it. A
            # host name per service, not per machine: two Advertisers on one device (each its own
            # zeroconf) must not own the same A records, or one's goodbye would erase the other's.
            server=self.name,
            parsed_addresses=self._addresses,
            properties=dict(properties),
        )

    async def _stop_announcing(self) -> None:
        announcing, self._announcing = self._announcing, None
        if announcing is not None and not announcing.done():
            announcing.cancel()
            # wait() rather than awaiting the task: its CancelledError is expected, ours must propagate.
            await asyncio.wait([announcing])


async def browse(
    service_type: str,
    *,
    timeout: float = 3.0,
    interfaces: list[str] | None = None,
) -> list[Service]:
    """Query for ``service_type`` and return every instance resolved within ``timeout`` seconds.

    mDNS has no "that was everyone" reply, so this always listens for the full ``timeout``.
    ``interfaces`` is required in practice (see the module docstring): ``None`` raises
    :class:`DiscoveryError` instead of quietly querying every interface. Each call starts with
    an empty cache, so only responders alive now are listed; an instance that says goodbye
    during the call is dropped. Results are deduplicated and sorted by name.
    """
    _check_service_type(service_type)
    if interfaces is None:
        raise DiscoveryError(f"browse({service_type!r}) sends multicast queries; {_INTERFACES_HELP}")
    if not timeout > 0:
        raise DiscoveryError(f"browse timeout must be a positive number of seconds, not {timeout!r}")
    choice = _interface_choice(interfaces)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    aiozc = await _open(choice)
    found: dict[str, Service] = {}
    resolving: dict[str, asyncio.Task[None]] = {}

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        remaining_ms = (deadline - loop.time()) * 1000
        if remaining_ms > 0 and await info.async_request(aiozc.zeroconf, remaining_ms):
            service = _service_from(service_type, info)
            if service is not None:
                found[name.lower()] = service

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        key = name.lower()  # mDNS names compare case-insensitively
        previous = resolving.pop(key, None)
        if previous is not None:
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            found.pop(key, None)
        else:
            resolving[key] = loop.create_task(resolve(name))

    browser: AsyncServiceBrowser | None = None
    try:
        browser = AsyncServiceBrowser(aiozc.zeroconf, [service_type], handlers=[on_change])
        await asyncio.sleep(max(0.0, deadline - loop.time()))
    finally:
        if browser is not None:
            await browser.async_cancel()
        for task in resolving.values():
            task.cancel()
        for outcome in await asyncio.gather(*resolving.values(), return_exceptions=True):
            if isinstance(outcome, Exception):
                log.warning("could not resolve a %s instance: %r", service_type, outcome)
        await aiozc.async_close()
    return sorted(found.values(), key=lambda service: service.name)


def _service_from(service_type: str, info: AsyncServiceInfo) -> Service | None:
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses or not info.port:
        return None
    properties = {key: value if value is not None else "" for key, value in info.decoded_properties.items()}
    return Service(type=service_type, name=info.name, host=addresses[0], port=info.port, properties=properties)


def _as_future(announced: Awaitable[None]) -> asyncio.Future[None]:
    return asyncio.ensure_future(announced)


def _check_service_type(service_type: str) -> None:
    try:
        service_type_name(service_type, strict=True)
    except BadTypeInNameException as exc:
        raise DiscoveryError(
            f"{service_type!r} is not a DNS-SD service type ({exc}); "
            f"use the form '_name._tcp.local.', e.g. {MQTT_SERVICE!r}"
        ) from exc


def _ipv4(text: str, what: str) -> str:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise DiscoveryError(f"mDNS {what} {text!r} is not an IPv4 address; edgewire's mDNS is IPv4 only") from exc
    if address.is_unspecified or address.is_multicast:
        raise DiscoveryError(f"mDNS {what} {text} does not name one interface; use the address of a real interface")
    return str(address)


def _interface_choice(interfaces: list[str]) -> InterfacesType:
    if not interfaces:
        raise DiscoveryError(f"interfaces=[] names no interface; {_INTERFACES_HELP}")
    if any(str(i).strip().lower() == ALL_INTERFACES for i in interfaces):
        if len(interfaces) != 1:
            raise DiscoveryError(
                f'interfaces={interfaces!r} mixes "{ALL_INTERFACES}" with addresses; {_INTERFACES_HELP}'
            )
        return InterfaceChoice.All
    return list(dict.fromkeys(_ipv4(i, "interface") for i in interfaces))


async def _open(interfaces: InterfacesType) -> AsyncZeroconf:
    """Open zeroconf on exactly these interfaces, or explain what to change.

    zeroconf raises bare OSError/RuntimeError for a missing interface and, for some errnos,
    skips the interface with only a log line; either way nothing would be sent, so both become
    a DiscoveryError here.
    """
    where = "every IPv4 interface" if interfaces is InterfaceChoice.All else f"interfaces {interfaces}"
    try:
        aiozc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise DiscoveryError(f"cannot open mDNS on {where}: {exc}; {_os_error_hint(exc)}") from exc
    except RuntimeError as exc:  # InterfaceChoice.All with no IPv4 interface up
        raise DiscoveryError(
            f"cannot open mDNS on {where}: {exc}; bring an interface up with an IPv4 address "
            "(inside a network namespace: `ip link set lo up`)"
        ) from exc
    try:
        await aiozc.zeroconf.async_wait_for_start()
    except (NotRunningException, TimeoutError, asyncio.TimeoutError) as exc:
        await aiozc.async_close()
        raise DiscoveryError(f"mDNS on {where} did not start: {exc!r}") from exc
    if not aiozc.zeroconf.engine.senders:
        await aiozc.async_close()
        raise DiscoveryError(
            f"mDNS on {where} has no interface it can send on (each was skipped: see zeroconf's log); "
            "check that the interfaces are up and multicast-capable (`ip link`), "
            f"or {_INTERFACES_HELP}"
        )
    return aiozc


def _os_error_hint(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            "UDP port 5353 is held exclusively by another mDNS stack; for avahi-daemon set "
            "disallow-other-stacks=no in avahi-daemon.conf and restart it"
        )
    if exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
        return f"no interface that is up holds that address; {_INTERFACES_HELP}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "the process may not open UDP port 5353 here; check the container's or sandbox's network policy"
    return f"check that the interfaces are up and multicast-capable (`ip link`); {_INTERFACES_HELP}"
