"""The EMQX cluster flash renders for more than one central broker: well-formed, and the same rules.

No EMQX runs here (the rendered configuration is untested against a real cluster); these tests
read the files back: emqx.conf as HOCON (the subset edgewire writes: ``key { ... }`` blocks and
``key = <JSON value>``), acl.conf as one Erlang term a rule, and users.csv's hashes recomputed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgewire import acl
from edgewire.errors import ConfigError
from edgewire.fleet import emqx, flash, sites

from .test_sites import write_fleet

NODES = ["emqx@10.0.0.1", "emqx@10.0.0.2", "emqx@10.0.0.3"]
RULE = re.compile(
    r'^\{(allow|deny), (all|\{username, "[A-Za-z0-9._-]+"\}), (publish|subscribe|all), \["([^"\s]+)"\]\}\.$'
)


def parse_hocon(text: str) -> dict[str, Any]:
    """The HOCON subset emqx.py writes, strictly: anything else is a failure."""
    root: dict[str, Any] = {}
    stack = [root]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "}":
            assert len(stack) > 1, f"line {number}: '}}' closes nothing"
            stack.pop()
            continue
        block = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*) \{", line)
        if block:
            key = block.group(1)
            assert key not in stack[-1], f"line {number}: {key} twice"
            stack[-1][key] = {}
            stack.append(stack[-1][key])
            continue
        pair = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*) = (.+)", line)
        assert pair, f"line {number}: not HOCON edgewire writes: {line!r}"
        assert pair.group(1) not in stack[-1], f"line {number}: {pair.group(1)} twice"
        stack[-1][pair.group(1)] = json.loads(pair.group(2))
    assert len(stack) == 1, "an unclosed block"
    return root


def fleet_file(tmp_path: Path, **central: Any) -> Path:
    path = tmp_path / "fleet.yaml"
    write_fleet(path, 21883, 22883)
    doc = yaml.safe_load(path.read_text())
    doc["central"].update(central)
    doc["credentials_secret"] = "s3cret"
    doc["broker_users"] = {"bridge-1": {"role": "bridge"}, "ops": {"role": "operator"}}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_central_cluster_renders_emqx_config_acl_and_users(tmp_path: Path) -> None:
    rendered = {r.device_id: r.files for r in flash.render(fleet_file(tmp_path, nodes=NODES))}
    central = rendered["central"]
    assert sites.CENTRAL_ACL in central  # the Mosquitto rendering stays beside it

    conf = parse_hocon(central[emqx.EMQX_CONF].decode())
    assert conf["cluster"]["discovery_strategy"] == "static" and conf["cluster"]["static"]["seeds"] == NODES
    assert conf["node"]["cookie"] == emqx.node_cookie("s3cret")
    assert conf["listeners"]["tcp"]["default"]["bind"] == "0.0.0.0:1883"
    assert conf["mqtt"]["use_username_as_clientid"] is True
    (authn,) = conf["authentication"]
    assert (authn["backend"], authn["user_id_type"]) == ("built_in_database", "username")
    assert authn["password_hash_algorithm"]["name"] == "pbkdf2"
    assert conf["authorization"]["no_match"] == "deny"
    assert conf["authorization"]["sources"][0]["type"] == "file"

    rules = central[emqx.EMQX_ACL].decode().splitlines()
    terms = [line for line in rules if not line.startswith("%%")]
    bad = [line for line in terms if not RULE.match(line) and line != "{deny, all}."]
    assert not bad and terms[-1] == "{deny, all}."
    # Every line of both Mosquitto ACLs, as the same EMQX rule.
    want = []
    roles = {"bridge-1": "bridge", "ops": "operator"}
    mosquitto = acl.mosquitto_acl(roles) + central[sites.CENTRAL_ACL].decode()  # type: ignore[arg-type]
    user = None
    for line in mosquitto.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
            continue
        if words[2].startswith("$share/"):
            continue
        who = "all" if words[0] == "pattern" else f'{{username, "{user}"}}'
        action = {"read": "subscribe", "write": "publish"}[words[1]]
        want.append(f'{{allow, {who}, {action}, ["{words[2].replace("%u", "${username}")}"]}}.')
    assert terms[:-1] == want
    assert '{allow, all, publish, ["req/${username}/+"]}.' in terms
    assert '{allow, {username, "site-a"}, subscribe, ["result/cam-a1"]}.' in terms
    assert not [t for t in terms if "site-a" in t and "cam-b" in t]

    users = list(csv.DictReader(io.StringIO(central[emqx.EMQX_USERS].decode())))
    by_id = {row["user_id"]: row for row in users}
    assert set(by_id) == {"cam-a1", "cam-a2", "cam-b1", "cam-b2", "bridge-1", "ops", "site-a", "site-b"}
    device_password = yaml.safe_load(rendered["cam-a1"][flash.DEVICE_CONFIG])["broker"]["password"]
    row = by_id["cam-a1"]
    digest = hashlib.pbkdf2_hmac("sha512", device_password.encode(), row["salt"].encode(), emqx.PBKDF2_ITERATIONS)
    assert row["password_hash"] == digest.hex() and row["is_superuser"] == "false"
    assert by_id["site-a"]["salt"] != row["salt"]
    # Rendering again changes nothing; the users and the cookie are secrets.
    again = {r.device_id: r.files for r in flash.render(fleet_file(tmp_path, nodes=NODES))}
    assert again["central"] == central
    changes = list(flash.plan(list(flash.render(fleet_file(tmp_path, nodes=NODES))), tmp_path / "out"))
    assert {c.path.name for c in changes if c.secret} >= {"users.csv", "emqx.conf"}


def test_one_central_broker_renders_no_cluster_and_a_cluster_needs_the_secret(tmp_path: Path) -> None:
    rendered = {r.device_id: r.files for r in flash.render(fleet_file(tmp_path, nodes=NODES[:1]))}
    assert emqx.EMQX_CONF not in rendered["central"]
    path = fleet_file(tmp_path, nodes=NODES)
    doc = yaml.safe_load(path.read_text())
    del doc["credentials_secret"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="credentials_secret"):
        flash.render(path)
    with pytest.raises(ConfigError, match="NAME@HOST"):
        flash.render(fleet_file(tmp_path, nodes=["10.0.0.1"]))
