"""More than one central broker: an EMQX cluster's configuration, rendered from the fleet file.

UNTESTED HERE: no EMQX runs on this machine. What is rendered follows EMQX 5's documented
configuration; the unit tests only check that the files are well-formed and carry the same rules
as the Mosquitto ACL. One Mosquitto is one process; past what it carries, EMQX nodes form one
broker (the same topics, retained messages, persistent sessions and MQTT 5 shared subscriptions
across nodes), so bridges, the distributor, operators and site uplinks work unchanged, pointed at
the cluster's load-balanced address.

Three files, under the central broker's folder:

- ``emqx.conf`` (HOCON): the node cookie (derived from the fleet's secret), the cluster with
  static seeds (the fleet file's node names), the MQTT listener, the MQTT limits that match
  the shipped Mosquitto's (message size, queued messages, client id = username), password
  logins from the built-in database (PBKDF2-SHA512) and authorization from the file below,
  denying whatever no rule allows.
- ``acl.conf``: the broker's ACL (edgewire.acl's roles and the sites' uplinks) as EMQX file
  rules, ``%u`` as ``${username}``; Mosquitto's ``read`` is EMQX's ``subscribe``, ``write`` its
  ``publish``.
- ``users.csv``: every login (devices, cloud-side users, site uplinks) hashed for EMQX's user
  import (``POST /api/v5/authentication/password_based:built_in_database/import_users``), with a
  salt derived per user so that rendering again gives the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import urlsplit

EMQX_CONF = "etc/emqx/emqx.conf"
EMQX_ACL = "etc/emqx/acl.conf"
EMQX_USERS = "etc/emqx/users.csv"
#: PBKDF2 rounds for the users EMQX stores (its default).
PBKDF2_ITERATIONS = 4096


def node_cookie(secret: str) -> str:
    """The Erlang cookie every node of the cluster shares, derived from the fleet's secret."""
    return hmac.new(secret.encode(), b"emqx-cluster-cookie", hashlib.sha256).hexdigest()


def _hocon(tree: dict[str, Any], indent: int = 0) -> list[str]:
    """A nested dict as HOCON: a map as ``key { ... }``, anything else as ``key = <JSON>``
    (HOCON is a superset of JSON, so every value is written in its JSON form)."""
    pad = "  " * indent
    lines = []
    for key, value in tree.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", *_hocon(value, indent + 1), f"{pad}}}"]
        else:
            lines.append(f"{pad}{key} = {json.dumps(value)}")
    return lines


def render_conf(*, nodes: list[str], listen_port: int, cluster_name: str, secret: str) -> str:
    tree: dict[str, Any] = {
        "node": {
            "cookie": node_cookie(secret),
            "data_dir": "data",
        },
        "cluster": {
            "name": cluster_name,
            "discovery_strategy": "static",
            "static": {"seeds": nodes},
        },
        "listeners": {"tcp": {"default": {"bind": f"0.0.0.0:{listen_port}", "max_connections": 1024000}}},
        "mqtt": {
            "max_packet_size": "8MB",
            "max_mqueue_len": 100000,
            "session_expiry_interval": "7d",
            "use_username_as_clientid": True,
        },
        "authentication": [
            {
                "mechanism": "password_based",
                "backend": "built_in_database",
                "user_id_type": "username",
                "password_hash_algorithm": {"name": "pbkdf2", "mac_fun": "sha512", "iterations": PBKDF2_ITERATIONS},
            }
        ],
        "authorization": {
            "no_match": "deny",
            "deny_action": "ignore",
            "cache": {"enable": True},
            "sources": [{"type": "file", "enable": True, "path": "${EMQX_ETC_DIR}/acl.conf"}],
        },
    }
    header = [
        "# edgewire central broker as an EMQX cluster: rendered by `edgewire flash` from the fleet file.",
        "# UNTESTED here (no EMQX in this project's tests); see README 'Large fleets'.",
        "# Each node sets its own name, e.g. EMQX_NODE__NAME=emqx@10.0.0.1, one of the seeds below.",
    ]
    return "\n".join(header + _hocon(tree)) + "\n"


def _emqx_topic(topic: str) -> str:
    return topic.replace("%u", "${username}").replace("%c", "${clientid}")


def render_acl(mosquitto_acls: list[str]) -> str:
    """Mosquitto ACL files (``pattern``, ``user`` and ``topic`` lines) as EMQX file rules, in
    order, then deny everything else. A shared-subscription line is left out: EMQX checks a
    ``$share/<group>/<filter>`` subscription by its filter."""
    rules = ["%% edgewire: rendered by `edgewire flash` from the broker's ACL; UNTESTED here (see README)."]
    for text in mosquitto_acls:
        user: str | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split(maxsplit=2)
            if words[0] == "user":
                user = words[1]
                continue
            if words[0] not in ("pattern", "topic"):
                raise ValueError(f"an ACL line edgewire does not render for EMQX: {line!r}")
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            if topic.startswith("$share/"):
                continue
            action = {"read": "subscribe", "write": "publish", "readwrite": "all"}[access]
            who = "all" if words[0] == "pattern" or user is None else f'{{username, "{user}"}}'
            rules.append(f'{{allow, {who}, {action}, ["{_emqx_topic(topic)}"]}}.')
    rules.append("{deny, all}.")
    return "\n".join(rules) + "\n"


def _salt(user: str, password: str) -> str:
    return hmac.new(password.encode(), b"emqx-salt:" + user.encode(), hashlib.sha256).hexdigest()[:24]


def render_users(passwords: dict[str, str]) -> str:
    """``user_id,password_hash,salt,is_superuser`` rows for EMQX's user import (PBKDF2-SHA512,
    hex, as ``emqx.conf`` declares)."""
    rows = ["user_id,password_hash,salt,is_superuser"]
    for user, password in sorted(passwords.items()):
        if "," in user or "\n" in user:
            raise ValueError(f"{user!r} cannot be an EMQX user id in CSV")
        salt = _salt(user, password)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt.encode(), PBKDF2_ITERATIONS).hex()
        rows.append(f"{user},{digest},{salt},false")
    return "\n".join(rows) + "\n"


def render_cluster(
    *, url: str, nodes: list[str], cluster_name: str, secret: str, acls: list[str], passwords: dict[str, str]
) -> dict[str, bytes]:
    """The three files for a cluster of ``nodes`` serving the broker at ``url``."""
    port = urlsplit(url).port or 1883
    return {
        EMQX_CONF: render_conf(nodes=nodes, listen_port=port, cluster_name=cluster_name, secret=secret).encode(),
        EMQX_ACL: render_acl(acls).encode(),
        EMQX_USERS: render_users(passwords).encode(),
    }
