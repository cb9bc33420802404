"""Who may publish and subscribe to what: the one set of broker rules, for every broker.

The rules are written once here, per role, over topics.md's families with ``%u`` standing for
the client's username, and are rendered as a Mosquitto ACL (:func:`mosquitto_acl`) and enforced
by the embedded broker (:func:`allowed`), so both brokers refuse the same things. One identity
rule goes with them: the MQTT client id is the username (:func:`identity_ok`), so no one can
log in with their own password and another's client id to knock that client off.

A device is bound to its own topic levels: it publishes only under its own id, and reads only
its own results, input, resent chunks and configuration, its fleet's configuration and the
model topics. Only bridges publish results, only operators publish announces and configuration,
only operators (a push) and the distributor (one answer to many devices' fetches at once) publish
chunks for the fleet, only the distributor resends chunks to one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Role = Literal["device", "bridge", "distributor", "operator", "monitor"]
ROLES: tuple[Role, ...] = ("device", "bridge", "distributor", "operator", "monitor")
Action = Literal["read", "write"]


@dataclass(frozen=True)
class Grant:
    action: Action
    pattern: str  # an MQTT topic filter; %u is the client's username


def _grants(action: Action, *patterns: str) -> tuple[Grant, ...]:
    return tuple(Grant(action, p) for p in patterns)


#: What every client may do under its own name: announce itself and report its numbers.
_OWN = _grants("write", "presence/%u", "telemetry/%u")

RULES: dict[Role, tuple[Grant, ...]] = {
    "device": _OWN
    + _grants("write", "req/%u/+", "local/%u", "model/fetch/%u/+", "model/status/%u/+", "config/reported/%u")
    + _grants(
        "read",
        "result/%u",
        "input/%u",
        "config/desired/%u",
        "config/fleet/+",
        "model/announce/+",
        "model/chunk/+/+/+",
        "model/resend/%u/+/+/+",
    ),
    # A bridge reads presence to know which devices to keep reading while one floods.
    "bridge": _OWN + _grants("read", "req/+/+", "presence/+") + _grants("write", "result/+"),
    "distributor": _OWN
    + _grants("read", "model/announce/+", "model/chunk/+/+/+", "model/fetch/+/+")
    + _grants("write", "model/resend/+/+/+/+", "model/chunk/+/+/+"),
    "operator": _OWN
    + _grants("read", "#")
    + _grants(
        "write",
        "model/announce/+",
        "model/chunk/+/+/+",
        "config/desired/+",
        "config/fleet/+",
        "input/+",
    ),
    "monitor": _OWN
    + _grants(
        "read",
        "presence/+",
        "telemetry/+",
        "local/+",
        "model/status/+/+",
        "model/announce/+",
        "config/reported/+",
        "config/desired/+",
        "config/fleet/+",
    ),
}

#: Roles whose tools open several short sessions at once (``edgewire model push`` while
#: ``edgewire watch`` runs): their client id may be the username plus ``-`` and a suffix.
_MANY_SESSIONS: frozenset[Role] = frozenset({"operator", "monitor"})


def identity_ok(role: Role, username: str, client_id: str) -> bool:
    """Whether ``username`` may connect as ``client_id``: the client id is the username (for
    operators and monitors, optionally followed by ``-`` and a suffix of their own)."""
    if client_id == username:
        return True
    return role in _MANY_SESSIONS and client_id.startswith(username + "-") and len(client_id) > len(username) + 1


def _covers(grant: str, wanted: str) -> bool:
    """Whether every topic ``wanted`` (a topic or a filter) can match also matches ``grant``."""
    g_levels, w_levels = grant.split("/"), wanted.split("/")
    for i, g in enumerate(g_levels):
        if g == "#":
            return True
        if i >= len(w_levels):
            return False
        w = w_levels[i]
        if g == "+":
            if w == "#":
                return False
            continue
        if g != w:
            return False
    return len(g_levels) == len(w_levels)


def allowed(role: Role, username: str, action: Action, topic: str) -> bool:
    """Whether ``username`` in ``role`` may ``action`` on ``topic`` (for ``read``, a
    subscription filter is allowed only if every topic it can match is)."""
    if "%" in username or "+" in username or "#" in username or "/" in username:
        return False  # a name that would change the pattern it is put in
    if topic.startswith("$share/"):
        parts = topic.split("/", 2)
        if len(parts) < 3 or action != "read":
            return False
        topic = parts[2]
    return any(
        grant.action == action and _covers(grant.pattern.replace("%u", username), topic) for grant in RULES[role]
    )


def mosquitto_acl(users: Mapping[str, Role]) -> str:
    """The rules as a Mosquitto ``acl_file``: device rules as ``%u`` patterns (so a new device
    needs only its password line), every other role as a ``user`` block naming its grants. A
    pattern applies to every user, so non-device users may also write under their own name
    in the device families; nothing of another client's is ever opened by it."""
    lines = [
        "# Rendered by `edgewire flash` from edgewire/acl.py; edit the fleet file, not this one.",
        "# Devices: username = client id = device id; %u is the username.",
    ]
    lines += [f"pattern {g.action} {g.pattern}" for g in RULES["device"]]
    for name, role in sorted(users.items()):
        if role == "device":
            continue
        if role not in RULES:
            raise ValueError(f"{name}: unknown role {role!r} (one of {', '.join(ROLES)})")
        lines += ["", f"# {role}", f"user {name}"]
        for g in RULES[role]:
            lines.append(f"topic {g.action} {g.pattern.replace('%u', name)}")
            if role == "bridge" and g.action == "read" and g.pattern.startswith("req/"):
                # Mosquitto checks a shared subscription by its whole filter.
                lines.append(f"topic read $share/+/{g.pattern}")
    return "\n".join(lines) + "\n"
