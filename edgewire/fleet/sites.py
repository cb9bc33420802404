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

A site may also run its own bridge and Triton (``tier:`` in the site's entry): the edge-server
tier between its devices and the cloud (cloud_bridge.upstream). Then the uplink carries neither
the devices' requests nor their answers themselves, so the cloud never serves a request the site
has not handed up and a device never gets the cloud's answer besides the site's: the site bridge
republishes a request it hands up on ``cloud/req/...``, which the uplink carries up as
``req/...``, and the cloud's ``result/<device>`` comes down as ``cloud/result/<device>``, for the
site bridge to send on as the one answer. flash renders that bridge's routing rules (the site's
model, then ``tier:cloud``), its settings and its systemd unit into the site's folder.

Everything here renders text; ``edgewire flash`` writes it beside the devices' files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from importlib import resources
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from edgewire.config import StrictModel
from edgewire.passwords import render_password_file

SITE_CONF = "etc/mosquitto/conf.d/edgewire-site.conf"
SITE_ACL = "etc/mosquitto/edgewire-site.acl"
SITE_PASSWD = "etc/mosquitto/edgewire-site.passwd"
CENTRAL_ACL = "etc/mosquitto/edgewire-sites.acl"
#: A site's own bridge (the edge-server tier): its routing rules, settings and unit.
SITE_BRIDGE_RULES = "etc/edgewire/site-rules.yaml"
SITE_BRIDGE_ENV = "etc/edgewire/bridge.env"
SITE_BRIDGE_UNIT = "etc/systemd/system/edgewire-bridge.service"
SITE_BRIDGE_CREDENTIALS = "etc/edgewire/credentials"  # /<user>: its password at the site broker
#: Where a site's bridge hands requests up and the cloud's answers come down, at the site broker
#: (the rules' ``upstream.prefix``); the uplink maps it to and from the plain topics.
UPLINK_PREFIX = "cloud/"

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
    # More than one central broker: the EMQX nodes that form it (``emqx@HOST``), the cluster's
    # static seeds; flash then renders the cluster's configuration (edgewire.fleet.emqx,
    # untested here), and ``url`` is the cluster's load-balanced address.
    nodes: list[str] = Field(default_factory=list)
    cluster_name: str = Field("edgewire", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not re.fullmatch(r"[A-Za-z0-9_-]+@[A-Za-z0-9_.-]+", n)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: an EMQX node name is NAME@HOST, e.g. emqx@10.0.0.1")
        if len(set(v)) != len(v):
            raise ValueError("lists a node more than once")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _mqtt_url(v)


class SiteTier(StrictModel):
    """A site's own bridge and Triton, serving its devices before the cloud does."""

    # The site's Triton, as the bridge reaches it.
    triton: str
    # The site's model in it; the cloud answers what it is unsure of, or cannot serve.
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    # A site answer less confident than this is handed up to the cloud.
    min_confidence: float = Field(0.8, ge=0, le=1)
    # Requests served at the site at once past which the site is busy and hands up.
    max_local_queue: int = Field(64, ge=1)

    @field_validator("triton")
    @classmethod
    def _triton(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("grpc", "http") or not parts.hostname:
            raise ValueError("expected grpc://HOST:PORT or http://HOST:PORT")
        return v


class Site(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    # The site broker its devices connect to (their broker url), and where it listens.
    url: str
    # Globs on device ids: the devices of this site.
    devices: list[str] = Field(min_length=1)
    # Messages the site broker keeps for the uplink while it is down (QoS 1), per client.
    max_queued_messages: int = Field(100_000, ge=1)
    # The edge-server tier: a bridge and Triton at the site, the cloud as its fallback.
    tier: SiteTier | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _mqtt_url(v)

    @property
    def bridge_client_id(self) -> str:
        return f"site-{self.name}"

    @property
    def tier_bridge_id(self) -> str:
        """The site's own bridge: its client id and username at the site broker."""
        return f"site-{self.name}-bridge"

    def holds(self, device_id: str) -> bool:
        return any(fnmatch.fnmatchcase(device_id, pattern) for pattern in self.devices)


def site_of(sites: list[Site], device_id: str) -> Site | None:
    """The first site whose globs take ``device_id`` (None: the device talks to the central broker)."""
    for site in sites:
        if site.holds(device_id):
            return site
    return None


def derived_password(secret: str, username: str) -> str:
    """A password derived from the fleet's secret as the devices' are (edgewire.fleet.flash)."""
    return hmac.new(secret.encode(), username.encode(), hashlib.sha256).hexdigest()[:32]


def uplink_password(secret: str, site: Site) -> str:
    """The site broker's uplink password at the central broker."""
    return derived_password(secret, site.bridge_client_id)


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
        lines += ["allow_anonymous false", f"password_file /{SITE_PASSWD}"]
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
    tiered = site.tier is not None
    lines.append("# up: what the site's devices send to the cloud")
    if tiered:
        lines.append(
            f"# requests only as the site's bridge hands them up: local {UPLINK_PREFIX}req/... is req/... centrally"
        )
    for pattern, qos in UP:
        lines.append(f"topic {pattern} out {qos}" + (_PREFIXED if tiered and pattern == "req/#" else ""))
    lines.append("# down: announces, chunks and fleet configs for all; answers, configs and resent chunks per device")
    if tiered:
        lines.append(f"# answers to the site's bridge only: result/<id> centrally is {UPLINK_PREFIX}result/<id> here")
    lines += [f"topic {pattern} in {qos}" for pattern, qos in DOWN_SHARED]
    for device in sorted(devices):
        for pattern, qos in DOWN_PER_DEVICE:
            prefixed = tiered and pattern.startswith("result/")
            lines.append(f"topic {pattern.format(device=device)} in {qos}" + (_PREFIXED if prefixed else ""))
    return "\n".join(lines) + "\n"


#: A bridge topic line's prefixes: local ``cloud/<topic>`` is remote ``<topic>`` ("" is empty).
_PREFIXED = f' {UPLINK_PREFIX} ""'


def render_site_acl(site: Site) -> str:
    """Each device (username = device id) to its own topics; the site's own bridge, if any, to
    the requests, answers and the uplinked prefix."""
    tier = ""
    if site.tier is not None:
        user = site.tier_bridge_id
        tier = (
            f"\nuser {user}\n"
            "topic read req/+/+\n"
            "topic read $share/+/req/+/+\n"
            "topic write result/+\n"
            f"topic write {UPLINK_PREFIX}req/#\n"
            f"topic read {UPLINK_PREFIX}result/+\n"
            f"topic write presence/{user}\n"
            f"topic write telemetry/{user}\n"
        )
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
    ) + tier


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
        if site.tier is not None:  # the site's own bridge announces itself through the uplink
            lines += [f"topic write presence/{site.tier_bridge_id}", f"topic write telemetry/{site.tier_bridge_id}"]
    return "\n".join(lines) + "\n"


def render_site_rules(site: Site, tier: SiteTier) -> str:
    """The site bridge's routing rules: the site's model first, the cloud as its fallback."""
    return (
        f"# edgewire site bridge of '{site.name}': rendered by `edgewire flash` from the fleet file; do not edit.\n"
        "# Served here first; handed up to the cloud when the site's answer is under min_confidence,\n"
        "# the site is busy or its Triton is down (cloud_bridge.rules, cloud_bridge.upstream).\n"
        "upstream:\n"
        f"  prefix: {UPLINK_PREFIX}\n"
        f"  max_local_queue: {tier.max_local_queue}\n"
        "default:\n"
        f'  route_to: [{tier.model}, "tier:cloud"]\n'
        "  strategy: fallback\n"
        f"  min_confidence: {tier.min_confidence}\n"
    )


def render_site_bridge(site: Site, tier: SiteTier, *, secret: str | None) -> dict[str, bytes]:
    """The site bridge's files: rules, settings (the shipped unit's EnvironmentFile) and the
    shipped unit with the bridge's id, which the site's ACL names; its password when derived."""
    user = site.tier_bridge_id
    local = urlsplit(site.url)
    env = [
        f"# edgewire site bridge of '{site.name}': rendered by `edgewire flash`; do not edit.",
        f"EDGEWIRE_BROKER=mqtt://{user}@{local.hostname}:{local.port or 1883}",
        f"EDGEWIRE_TRITON={tier.triton}",
        f"EDGEWIRE_RULES=/{SITE_BRIDGE_RULES}",
    ]
    files = {SITE_BRIDGE_RULES: render_site_rules(site, tier).encode()}
    if secret:
        env.append(f"EDGEWIRE_MQTT_PASSWORD_FILE=/{SITE_BRIDGE_CREDENTIALS}/{user}")
        files[f"{SITE_BRIDGE_CREDENTIALS}/{user}"] = (derived_password(secret, user) + "\n").encode()
    files[SITE_BRIDGE_ENV] = ("\n".join(env) + "\n").encode()
    unit = resources.files("edgewire.systemd").joinpath("edgewire-bridge.service").read_text()
    if "--id %H" not in unit:
        raise RuntimeError("the shipped edgewire-bridge.service no longer names its id as '--id %H'")
    files[SITE_BRIDGE_UNIT] = unit.replace("--id %H", f"--id {user}").encode()
    return files


def render_brokers(
    central: Central,
    sites: list[Site],
    devices_by_site: dict[str, list[str]],
    *,
    secret: str | None,
    passwords: dict[str, str] | None = None,
) -> dict[str, dict[str, bytes]]:
    """Files per folder: each site broker's (``site-<name>``) and the central broker's ACL for
    the uplinks (``central``), as flash writes them beside the devices'. With a secret the site
    broker takes logins: its password file holds the site's devices (``passwords``) and the
    site's own bridge."""
    out: dict[str, dict[str, bytes]] = {}
    for site in sites:
        devices = devices_by_site.get(site.name, [])
        out[site.bridge_client_id] = {
            SITE_CONF: render_site_conf(site, central, devices, secret=secret).encode(),
            SITE_ACL: render_site_acl(site).encode(),
        }
        if secret:
            logins = {d: (passwords or {})[d] for d in devices if d in (passwords or {})}
            if site.tier is not None:
                logins[site.tier_bridge_id] = derived_password(secret, site.tier_bridge_id)
            out[site.bridge_client_id][SITE_PASSWD] = render_password_file(logins).encode()
        if site.tier is not None:
            out[site.bridge_client_id] |= render_site_bridge(site, site.tier, secret=secret)
    out["central"] = {CENTRAL_ACL: render_central_acl(sites, devices_by_site).encode()}
    return out
