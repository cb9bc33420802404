"""Rendering a fleet template into each device's files, before the devices ship.

``edgewire flash`` reads one fleet file (shared defaults plus per-device overrides), renders
every selected device's configuration, validates all of them, and only then writes anything:
one bad device stops the whole run with the file, the line and the fix, and leaves the disk as
it was. Writes are atomic (temp file, fsync, rename) and skipped when the bytes are unchanged,
so a second run reports that nothing changed.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import hmac
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from edgewire import acl
from edgewire.broker import mosquitto_plugin
from edgewire.config import (
    BrokerSettings,
    DeviceConfig,
    StrictModel,
    deep_merge,
    format_validation_error,
    load_yaml_model,
)
from edgewire.errors import ConfigError
from edgewire.fleet import emqx
from edgewire.fleet import sites as fleet_sites
from edgewire.fleet.ca import FleetCA
from edgewire.passwords import render_password_file
from edgewire.profiles import available_profiles

DEVICE_CONFIG = "etc/edgewire/device.yaml"
SIGNING_KEY = "etc/edgewire/fleet-signing.pub"
BROKER_CA = "etc/edgewire/broker-ca.pem"  # the CA that signed the broker's certificate (TLS)
CLIENT_CERT = "etc/edgewire/client.pem"  # mutual TLS: the device's certificate (CN = device id)
CLIENT_KEY = "etc/edgewire/client.key"
UNIT = "etc/systemd/system/edgewire-edge.service"
#: The broker's side of the fleet, under ``--broker-out``: both brokers read PASSWD; Mosquitto
#: reads ACL, the embedded broker ROLES (and applies the same rules from edgewire.acl).
BROKER_PASSWD = "passwd"
BROKER_ACL = "acl"
BROKER_ROLES = "roles.yaml"
BROKER_CREDENTIALS = "credentials"  # credentials/<user>: the password of each cloud-side user
#: Mutual TLS, under ``--broker-out``: the CA that signed the clients' certificates, the
#: certificates no longer trusted, the broker's certificate and key, and Mosquitto's listener
#: (credentials/<user>.pem and .key: each cloud-side user's certificate).
BROKER_CLIENT_CA = "ca.pem"
BROKER_CRL = "crl.pem"
BROKER_CERT = "server.pem"
BROKER_KEY = "server.key"
BROKER_MTLS_CONF = "mosquitto-mtls.conf"
BROKER_FLOOD_LIMIT_CONF = "mosquitto-flood-limit.conf"  # loads broker/mosquitto_flood_limit.c
#: Where the broker's files are installed (the paths broker/mosquitto.conf names).
BROKER_INSTALL_DIR = "/etc/mosquitto/edgewire"
#: Files only their owner may read (and every ``*.key``).
SECRET_NAMES = (
    "device.yaml",
    BROKER_PASSWD,
    Path(fleet_sites.SITE_PASSWD).name,
    Path(emqx.EMQX_USERS).name,
    Path(emqx.EMQX_CONF).name,  # the node cookie
)


class DeviceRange(StrictModel):
    """Many devices at once: prefix + zero-padded numbers, e.g. cam-001 .. cam-200."""

    prefix: str
    start: int = Field(1, ge=0)
    stop: int = Field(ge=0)
    width: int = Field(3, ge=1, le=12)

    @model_validator(mode="after")
    def _order(self) -> DeviceRange:
        if self.stop < self.start:
            raise ValueError("stop must not be below start")
        return self

    def ids(self) -> list[str]:
        return [f"{self.prefix}{n:0{self.width}d}" for n in range(self.start, self.stop + 1)]


class DeviceEntry(StrictModel):
    id: str | None = None
    range: DeviceRange | None = None
    password: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of(self) -> DeviceEntry:
        if (self.id is None) == (self.range is None):
            raise ValueError("give either 'id' or 'range'")
        return self


class BrokerUser(StrictModel):
    """A cloud-side identity: a bridge (its bridge id), a distributor (its client id), an
    operator or a monitor. Its password is given, or derived like a device's."""

    role: Literal["bridge", "distributor", "operator", "monitor"]
    password: str | None = None


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


class ClientCertificates(StrictModel):
    """Mutual TLS: every broker user gets a certificate from the fleet's CA (CN = device id or
    username), and the broker takes the certificate's CN as the login."""

    # The CA's folder, relative to the fleet file; created with a new CA on the first flash.
    ca_dir: Path = Path("fleet-ca")
    days: int = Field(825, ge=31, le=3650)
    # Names (or IP addresses) in the broker's certificate; default: the broker url's host. Not
    # used when broker_ca is given (the broker's certificate then comes from that CA).
    broker_names: list[str] = Field(default_factory=list)

    @field_validator("broker_names")
    @classmethod
    def _host_names(cls, v: list[str]) -> list[str]:
        for name in v:
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(name)
                continue
            labels = name.removeprefix("*.").split(".")
            if not all(label and len(label) <= 63 and _HOST_LABEL.fullmatch(label) for label in labels):
                raise ValueError(f"{name!r} is not a host name or IP address (letters, digits, '-' and '.')")
        return v


class Fleet(StrictModel):
    fleet: str
    broker: dict[str, Any]
    # The broker's users that are not devices, by username (= client id).
    broker_users: dict[str, BrokerUser] = Field(default_factory=dict)
    # Derives each device's MQTT password (HMAC of the device id) when none is given, so
    # re-rendering is repeatable without storing a password per device.
    credentials_secret: str | None = None
    signing_public_key: str | None = None
    # TLS: the CA (PEM) that signed the broker's certificate. Written to each device as
    # BROKER_CA and named in its broker settings; the fleet's broker url is then mqtts://.
    broker_ca: str | None = None
    client_certificates: ClientCertificates | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    devices: list[DeviceEntry] = Field(min_length=1)
    # Site brokers bridged to a central one (edgewire.fleet.sites); a site's devices talk only to it.
    central: fleet_sites.Central | None = None
    sites: list[fleet_sites.Site] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sites_need_central(self) -> Fleet:
        if self.sites and self.central is None:
            raise ValueError("'sites' bridge to a central broker: add 'central: {url: mqtt://HOST:PORT}'")
        return self

    @model_validator(mode="after")
    def _mtls_needs_tls(self) -> Fleet:
        if self.client_certificates is not None and not str(self.broker.get("url", "")).startswith("mqtts://"):
            raise ValueError("client_certificates need TLS: give the broker url as mqtts://HOST:PORT")
        return self

    @field_validator("defaults")
    @classmethod
    def _no_identity_in_defaults(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "device_id" in v:
            raise ValueError("device_id belongs to each device, not to defaults")
        return v


@dataclass(frozen=True)
class Rendered:
    device_id: str
    files: dict[str, bytes]
    root: Path | None = None  # written here rather than under the output folder


@dataclass(frozen=True)
class Change:
    device_id: str
    path: Path
    old: bytes | None
    new: bytes

    @property
    def secret(self) -> bool:
        """Whether only its owner may read it (it holds a password or a hash of one)."""
        return (
            self.path.name in SECRET_NAMES or self.path.parent.name == BROKER_CREDENTIALS or self.path.suffix == ".key"
        )

    def diff(self) -> str:
        if self.secret and self.path.name != "device.yaml":  # never printed; the device's file always was
            return f"--- a/{self.path}\n+++ b/{self.path}\n(secret: {len(self.new)} bytes, not shown)\n"
        old = (self.old or b"").decode(errors="replace").splitlines(keepends=True)
        new = self.new.decode(errors="replace").splitlines(keepends=True)
        return "".join(difflib.unified_diff(old, new, f"a/{self.path}", f"b/{self.path}"))


def _line_of(text: str, path: list[Any]) -> int | None:
    from edgewire.config import _line_for, _line_marks

    return _line_for(_line_marks(yaml.compose(text, Loader=yaml.SafeLoader)), tuple(path))


def _unit_text() -> bytes:
    return resources.files("edgewire.systemd").joinpath("edgewire-edge.service").read_bytes()


def _password(fleet: Fleet, username: str, given: str | None) -> str | None:
    if given:
        return given
    if fleet.credentials_secret:
        return hmac.new(fleet.credentials_secret.encode(), username.encode(), hashlib.sha256).hexdigest()[:32]
    return None


def _fleet_ca(fleet_file: Path, fleet: Fleet) -> FleetCA | None:
    if fleet.client_certificates is None:
        return None
    folder = fleet.client_certificates.ca_dir
    folder = folder if folder.is_absolute() else fleet_file.parent / folder
    return FleetCA(folder, fleet=fleet.fleet, days=fleet.client_certificates.days)


def load_ca(fleet_file: Path) -> FleetCA | None:
    """The fleet's CA when it uses client certificates (a new one, in memory, on the first
    run): give the same one to :func:`render` and :func:`render_broker`, then write
    :func:`ca_files` with the rest."""
    return _fleet_ca(fleet_file, load_yaml_model(fleet_file, Fleet))


def ca_files(ca: FleetCA | None) -> list[Rendered]:
    """What a flash adds to the CA's folder: a new CA, certificates issued, the revocation list."""
    if ca is None or not ca.pending:
        return []
    return [Rendered("fleet-ca", dict(ca.pending), root=ca.folder)]


def _reissue(name: str, reissue: str | None) -> bool:
    return reissue is not None and fnmatch.fnmatchcase(name, reissue)


def mosquitto_mtls_listener(port: int, install_dir: str = BROKER_INSTALL_DIR) -> str:
    """Mosquitto's mutual-TLS listener: a client certificate from the fleet's CA is required,
    and its CN is the login (``use_identity_as_username``; no password is asked), so the ACL's
    ``%u`` applies to the certificate's name. Mosquitto keeps ``use_username_as_clientid`` per
    listener, so it is repeated here: the client id becomes the CN, whatever the client asked."""
    return (
        "# Rendered by `edgewire flash` (client_certificates): the mutual-TLS listener. Append it to\n"
        "# broker/mosquitto.conf; keep the password listener on 127.0.0.1 for local tools, or remove it.\n"
        f"listener {port}\n"
        f"cafile {install_dir}/{BROKER_CLIENT_CA}\n"
        f"certfile {install_dir}/{BROKER_CERT}\n"
        f"keyfile {install_dir}/{BROKER_KEY}\n"
        f"crlfile {install_dir}/{BROKER_CRL}\n"
        "tls_version tlsv1.2\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "use_username_as_clientid true\n"
    )


def render_broker(fleet_file: Path, *, ca: FleetCA | None = None, reissue: str | None = None) -> Rendered:
    """The broker's files for the whole fleet: every device and cloud-side user's password
    (hashed as mosquitto_passwd does), the Mosquitto ACL and the roles; plus, for each
    cloud-side user, its own password in ``credentials/<user>`` to hand to that service. With
    client certificates also the clients' CA, the revocation list, the broker's certificate
    (unless ``broker_ca`` names another CA for it), each cloud-side user's certificate and
    Mosquitto's mutual-TLS listener; passwords are then optional."""
    fleet = load_yaml_model(fleet_file, Fleet)
    if ca is None:
        ca = _fleet_ca(fleet_file, fleet)
    passwords: dict[str, str] = {}
    missing: list[str] = []
    device_ids: list[str] = []
    for entry in fleet.devices:
        for device_id in [entry.id] if entry.id else entry.range.ids():  # type: ignore[union-attr]
            device_ids.append(device_id)
            password = _password(fleet, device_id, entry.password)
            if password is None:
                missing.append(device_id)
            else:
                passwords[device_id] = password
    files: dict[str, bytes] = {}
    for name, user in fleet.broker_users.items():
        if name in passwords or name in device_ids:
            raise ConfigError(f"{fleet_file}: broker user {name!r} is also a device id -- give it another name")
        if ca is not None:
            cert, key = ca.client(name, reissue=_reissue(name, reissue))
            files[f"{BROKER_CREDENTIALS}/{name}.pem"] = cert
            files[f"{BROKER_CREDENTIALS}/{name}.key"] = key
        password = _password(fleet, name, user.password)
        if password is None:
            missing.append(name)
            continue
        passwords[name] = password
        files[f"{BROKER_CREDENTIALS}/{name}"] = (password + "\n").encode()
    if missing and ca is None:
        raise ConfigError(
            f"{fleet_file}: no password for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            "-- set credentials_secret (passwords derived per user) or give each a password"
        )
    roles = {name: user.role for name, user in fleet.broker_users.items()}
    files[BROKER_PASSWD] = render_password_file(passwords).encode()
    files[BROKER_ACL] = acl.mosquitto_acl(roles).encode()
    files[BROKER_ROLES] = yaml.safe_dump(dict(sorted(roles.items())), sort_keys=False).encode()
    files[BROKER_FLOOD_LIMIT_CONF] = mosquitto_plugin.fleet_conf(roles).encode()
    if ca is not None and fleet.client_certificates is not None:
        try:
            settings = BrokerSettings.model_validate(fleet.broker)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(fleet_file, exc, BrokerSettings, {})) from None
        files[BROKER_CLIENT_CA] = ca.cert_pem
        files[BROKER_CRL] = ca.revocation_list([*device_ids, *fleet.broker_users])
        if fleet.broker_ca is None:
            names = fleet.client_certificates.broker_names or [settings.host]
            files[BROKER_CERT], files[BROKER_KEY] = ca.server(names)
        files[BROKER_MTLS_CONF] = mosquitto_mtls_listener(settings.port).encode()
    return Rendered("broker", files)


def render(
    fleet_file: Path, select: str | None = None, *, ca: FleetCA | None = None, reissue: str | None = None
) -> list[Rendered]:
    """Every selected device's files, all validated; ConfigError (file, line, fix) otherwise.
    With client certificates each device gets its own (the one issued before while good, a new
    one for devices matching ``reissue``)."""
    fleet = load_yaml_model(fleet_file, Fleet)
    if ca is None:
        ca = _fleet_ca(fleet_file, fleet)
    text = fleet_file.read_text(encoding="utf-8")
    problems: list[str] = []
    seen: dict[str, int] = {}
    out: list[Rendered] = []
    unit = _unit_text()
    site_devices: dict[str, list[str]] = {}
    site_passwords: dict[str, str] = {}
    all_passwords: dict[str, str] = {}
    for index, entry in enumerate(fleet.devices):
        ids = [entry.id] if entry.id else entry.range.ids()  # type: ignore[union-attr]
        for device_id in ids:
            line = _line_of(text, ["devices", index]) or 0
            if device_id in seen:
                problems.append(
                    f"  {fleet_file}:{line}: devices[{index}]: device id {device_id!r} already used by "
                    f"devices[{seen[device_id]}] -- give each device its own id"
                )
                continue
            seen[device_id] = index
            if select and not fnmatch.fnmatchcase(device_id, select):
                continue
            doc = deep_merge(fleet.defaults, entry.overrides)
            doc = deep_merge(doc, {"device_id": device_id, "fleet": fleet.fleet, "broker": fleet.broker})
            site = fleet_sites.site_of(fleet.sites, device_id)
            if site is not None:
                doc["broker"] = {**doc["broker"], "url": site.url}
                site_devices.setdefault(site.name, []).append(device_id)
            password = _password(fleet, device_id, entry.password)
            if password:
                doc["broker"] = {**doc["broker"], "username": device_id, "password": password}
                all_passwords[device_id] = password
                if site is not None:
                    site_passwords[device_id] = password
            if fleet.broker_ca or ca is not None:
                doc["broker"] = {**doc["broker"], "ca_file": f"/{BROKER_CA}"}
            if ca is not None:
                doc["broker"] = {**doc["broker"], "cert_file": f"/{CLIENT_CERT}", "key_file": f"/{CLIENT_KEY}"}
            try:
                cfg = DeviceConfig.model_validate(doc)
            except ValidationError as exc:
                detail = format_validation_error(fleet_file, exc, DeviceConfig, {}).splitlines()[1:]
                problems += [
                    f"  {fleet_file}:{line}: devices[{index}] ({device_id}):{d.split(':', 1)[1]}" for d in detail
                ]
                continue
            if cfg.profile not in available_profiles() and not Path(cfg.profile).suffix:
                problems.append(
                    f"  {fleet_file}:{line}: devices[{index}] ({device_id}): profile {cfg.profile!r} is unknown "
                    f"-- use one of {', '.join(available_profiles())}"
                )
                continue
            files = {
                DEVICE_CONFIG: yaml.safe_dump(
                    cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False
                ).encode(),
                UNIT: unit,
            }
            if fleet.signing_public_key:
                files[SIGNING_KEY] = (fleet.signing_public_key.strip() + "\n").encode()
            if fleet.broker_ca:
                files[BROKER_CA] = (fleet.broker_ca.strip() + "\n").encode()
            elif ca is not None:
                files[BROKER_CA] = ca.cert_pem
            if ca is not None:
                files[CLIENT_CERT], files[CLIENT_KEY] = ca.client(device_id, reissue=_reissue(device_id, reissue))
            out.append(Rendered(device_id, files))
    if problems:
        raise ConfigError(f"invalid fleet {fleet_file} (nothing was written):\n" + "\n".join(problems))
    if select and not out:
        raise ConfigError(f"no device of {fleet_file} matches --devices {select!r}")
    if fleet.sites and fleet.central is not None and not select:
        brokers = fleet_sites.render_brokers(
            fleet.central, fleet.sites, site_devices, secret=fleet.credentials_secret, passwords=site_passwords
        )
        out += [Rendered(folder, files) for folder, files in brokers.items()]
    if fleet.central is not None and len(fleet.central.nodes) > 1 and not select:
        cluster = _emqx_cluster(fleet_file, fleet, site_devices, all_passwords)
        central = next((r for r in out if r.device_id == "central"), None)
        out = [r for r in out if r is not central]
        out.append(Rendered("central", {**(central.files if central else {}), **cluster}))
    return out


def _emqx_cluster(
    fleet_file: Path, fleet: Fleet, site_devices: dict[str, list[str]], device_passwords: dict[str, str]
) -> dict[str, bytes]:
    """The central broker as an EMQX cluster (edgewire.fleet.emqx): every login and the same rules
    as the Mosquitto ACLs flash renders for it (the broker's roles and the sites' uplinks)."""
    central = fleet.central
    assert central is not None
    secret = fleet.credentials_secret
    if not secret:
        raise ConfigError(
            f"{fleet_file}: central.nodes makes an EMQX cluster, whose node cookie and logins are derived "
            "from credentials_secret -- set credentials_secret"
        )
    passwords = dict(device_passwords)
    for name, user in fleet.broker_users.items():
        passwords[name] = _password(fleet, name, user.password) or ""
    for site in fleet.sites:
        passwords[site.bridge_client_id] = fleet_sites.uplink_password(secret, site)
    roles = {name: user.role for name, user in fleet.broker_users.items()}
    acls = [acl.mosquitto_acl(roles)]
    if fleet.sites:
        acls.append(fleet_sites.render_central_acl(fleet.sites, site_devices))
    return emqx.render_cluster(
        url=central.url,
        nodes=central.nodes,
        cluster_name=central.cluster_name,
        secret=secret,
        acls=acls,
        passwords=passwords,
    )


def plan(rendered: list[Rendered], root: Path, per_device_dirs: bool = True) -> Iterator[Change]:
    """What writing would change, file by file (unchanged files are not listed)."""
    for device in rendered:
        if device.root is not None:
            base = device.root
        else:
            base = root / device.device_id if per_device_dirs else root
        for rel, data in sorted(device.files.items()):
            path = base / rel
            old = path.read_bytes() if path.exists() else None
            if old != data:
                yield Change(device.device_id, path, old, data)


def write(changes: list[Change], progress: Callable[[Change], None] | None = None) -> None:
    for change in changes:
        change.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=change.path.parent, prefix=f".{change.path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(change.new)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600 if change.secret else 0o644)
            os.replace(tmp, change.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if progress is not None:
            progress(change)
