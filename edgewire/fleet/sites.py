"""A fleet spread over sites: each site's Mosquitto bridged to one central broker.

Devices on a site talk only to their site broker; the site broker carries their traffic to the
central broker over one bridge connection (Mosquitto's ``connection`` feature), where the cloud
bridges, the distributor and the operators are. When the uplink drops, the site keeps working:
devices still reach their site broker, QoS 1 traffic for the cloud waits in the bridge's
persistent session (``cleansession false``) on each side, and flows once the uplink returns.

What crosses the uplink, per topics.md:

- up (``out``): requests, presence, telemetry, model statuses and fetches, reported configs;
- down (``in``): results, desired configs and resent chunks of *this site's devices only* (one
  topic line per device and family), announces, chunks and fleet configs.

So a site broker never holds another site's answers or configs, and its ACL binds each device
(username = device id) to its own topics. Device ids are unique across the fleet (flash checks),
so topics need no per-site prefix at the central broker, and everything that consumes them
there (bridges, distributor, rollout) works unchanged.

Everything here renders text; ``edgewire flash`` writes it beside the devices' files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from edgewire.config import StrictModel

SITE_CONF = "etc/mosquitto/conf.d/edgewire-site.conf"
SITE_ACL = "etc/mosquitto/edgewire-site.acl"
CENTRAL_ACL = "etc/mosquitto/edgewire-sites.acl"

# Topic filters the uplink carries up, with their QoS (topics.md).
UP = [
    ("req/#", 1),
    ("presence/#", 1),
    ("telemetry/#", 0),
    ("model/status/#", 1),
    ("model/fetch/#", 1),
    ("config/reported/#", 1),
]
# Down for every device of the site.
DOWN_SHARED = [("model/announce/#", 1), ("model/chunk/#", 1), ("config/fleet/#", 1)]
# Down per device: each site gets only its own devices' answers and configs.
DOWN_PER_DEVICE = [("result/{device}", 1), ("config/desired/{device}", 1), ("model/resend/{device}/#", 1)]


def _mqtt_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError("expected mqtt://HOST[:PORT]")
    return value


class Central(StrictModel):
    """The broker every site bridges to."""

    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _mqtt_url(v)


class Site(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    # The site broker its devices connect to (their broker url), and where it listens.
    url: str
    # Globs on device ids: the devices of this site.
    devices: list[str] = Field(min_length=1)
    # Messages the site broker keeps for the uplink while it is down (QoS 1), per client.
    max_queued_messages: int = Field(100_000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _mqtt_url(v)

    @property
    def bridge_client_id(self) -> str:
        return f"site-{self.name}"

    def holds(self, device_id: str) -> bool:
        return any(fnmatch.fnmatchcase(device_id, pattern) for pattern in self.devices)


def site_of(sites: list[Site], device_id: str) -> Site | None:
    """The first site whose globs take ``device_id`` (None: the device talks to the central broker)."""
    for site in sites:
        if site.holds(device_id):
            return site
    return None


def uplink_password(secret: str, site: Site) -> str:
    """The site bridge's password at the central broker, derived as the devices' are."""
    return hmac.new(secret.encode(), site.bridge_client_id.encode(), hashlib.sha256).hexdigest()[:32]


def render_site_conf(site: Site, central: Central, devices: list[str], *, secret: str | None) -> str:
    """The site broker's whole Mosquitto configuration: its listener and its uplink bridge."""
    local = urlsplit(site.url)
    remote = urlsplit(central.url)
    lines = [
        f"# edgewire site broker '{site.name}', rendered by `edgewire flash` from the fleet file: do not edit.",
        "per_listener_settings false",
        f"listener {local.port or 1883} {local.hostname}",
    ]
    if secret:
        lines += ["allow_anonymous false", "password_file /etc/mosquitto/edgewire-site.passwd"]
    else:
        lines += ["# no credentials_secret in the fleet file: a lab site, anonymous devices", "allow_anonymous true"]
    lines += [
        f"acl_file /etc/mosquitto/{SITE_ACL.rsplit('/', 1)[1]}",
        "set_tcp_nodelay true",
        "message_size_limit 8388608",
        f"max_queued_messages {site.max_queued_messages}",
        "persistence true",
        "persistence_location /var/lib/mosquitto/",
        "autosave_interval 30",
        "",
        "# The uplink: one bridge connection to the central broker. cleansession false keeps a",
        "# persistent session on both sides, so QoS 1 traffic waits out an uplink drop.",
        "connection edgewire-uplink",
        f"address {remote.hostname}:{remote.port or 1883}",
        f"remote_clientid {site.bridge_client_id}",
        f"local_clientid {site.bridge_client_id}-local",
        "cleansession false",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "start_type automatic",
        "restart_timeout 1 30",
        "keepalive_interval 10",
        "notifications false",
    ]
    if secret:
        lines += [f"remote_username {site.bridge_client_id}", f"remote_password {uplink_password(secret, site)}"]
    lines.append("# up: what the site's devices send to the cloud")
    lines += [f"topic {pattern} out {qos}" for pattern, qos in UP]
    lines.append("# down: announces, chunks and fleet configs for all; answers, configs and resent chunks per device")
    lines += [f"topic {pattern} in {qos}" for pattern, qos in DOWN_SHARED]
    for device in sorted(devices):
        lines += [f"topic {pattern.format(device=device)} in {qos}" for pattern, qos in DOWN_PER_DEVICE]
    return "\n".join(lines) + "\n"


def render_site_acl(site: Site) -> str:
    """Each device (username = device id) to its own topics; the uplink bridge to what it carries."""
    return (
        f"# edgewire site broker '{site.name}': rendered by `edgewire flash`; do not edit.\n"
        "pattern write req/%u/#\n"
        "pattern read result/%u\n"
        "pattern write local/%u\n"
        "pattern read input/%u\n"
        "pattern write presence/%u\n"
        "pattern write telemetry/%u\n"
        "pattern read model/announce/#\n"
        "pattern read model/chunk/#\n"
        "pattern read model/resend/%u/#\n"
        "pattern write model/fetch/%u/#\n"
        "pattern write model/status/%u/#\n"
        "pattern read config/desired/%u\n"
        "pattern read config/fleet/#\n"
        "pattern write config/reported/%u\n"
    )


def render_central_acl(sites: list[Site], devices_by_site: dict[str, list[str]]) -> str:
    """What each site's uplink may do at the central broker: publish for its own devices only
    and read only its own devices' answers and configs."""
    lines = ["# edgewire sites at the central broker: rendered by `edgewire flash`; do not edit."]
    for site in sites:
        lines += ["", f"user {site.bridge_client_id}"]
        for device in sorted(devices_by_site.get(site.name, [])):
            lines += [
                f"topic write req/{device}/#",
                f"topic write presence/{device}",
                f"topic write telemetry/{device}",
                f"topic write model/status/{device}/#",
                f"topic write model/fetch/{device}/#",
                f"topic write config/reported/{device}",
                f"topic read result/{device}",
                f"topic read config/desired/{device}",
                f"topic read model/resend/{device}/#",
            ]
        lines += ["topic read model/announce/#", "topic read model/chunk/#", "topic read config/fleet/#"]
    return "\n".join(lines) + "\n"


def render_brokers(
    central: Central, sites: list[Site], devices_by_site: dict[str, list[str]], *, secret: str | None
) -> dict[str, dict[str, bytes]]:
    """Files per folder: each site broker's (``site-<name>``) and the central broker's ACL for
    the uplinks (``central``), as flash writes them beside the devices'."""
    out: dict[str, dict[str, bytes]] = {}
    for site in sites:
        devices = devices_by_site.get(site.name, [])
        out[site.bridge_client_id] = {
            SITE_CONF: render_site_conf(site, central, devices, secret=secret).encode(),
            SITE_ACL: render_site_acl(site).encode(),
        }
    out["central"] = {CENTRAL_ACL: render_central_acl(sites, devices_by_site).encode()}
    return out
