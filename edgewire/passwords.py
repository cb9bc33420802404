"""Broker password files in Mosquitto 2's format, written and checked without its tools.

``edgewire flash`` renders the file Mosquitto reads (``password_file``) and the embedded broker
checks logins against the same file, so one fleet file gives both brokers the same users. The
format is ``mosquitto_passwd``'s: ``user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``
(12-byte salt, 101 iterations, as Mosquitto 2 writes it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from edgewire.errors import ConfigError

ITERATIONS = 101
SALT_BYTES = 12


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash; any other or malformed hash matches nothing."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        want = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if not 0 < iterations <= 1_000_000:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(got, want)


def render_password_file(passwords: dict[str, str]) -> str:
    """``user:hash`` lines, sorted by user. Each salt is derived from the user and the password,
    so rendering the same fleet again gives the same bytes (and ``flash`` reports no change),
    while two users never share a salt and a new password gets a new one."""
    for user in passwords:
        if not user or ":" in user or "\n" in user:
            raise ConfigError(f"{user!r} cannot be a broker username (no ':' or newline, not empty)")
    lines = []
    for user, password in sorted(passwords.items()):
        salt = hashlib.sha256(b"edgewire-broker-salt\0" + user.encode() + b"\0" + password.encode()).digest()
        lines.append(f"{user}:{hash_password(password, salt=salt[:SALT_BYTES])}\n")
    return "".join(lines)


def read_password_file(path: Path) -> dict[str, str]:
    """user -> hash, from a file in the format above; ConfigError naming the line if malformed."""
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith("$7$"):
            raise ConfigError(f"{path}:{number}: expected user:$7$... (as mosquitto_passwd writes it)")
        users[user] = hashed
    return users
