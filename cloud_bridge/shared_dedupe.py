"""One request, one run, across every bridge on a host that serves one fleet.

Bridges that share the request stream (``$share`` on MQTT 5) each get part of it, and each
bridge's own dedupe only knows what it ran itself. After a broker restart the broker delivers
again what it had not seen acknowledged, and a redelivered request can land on another bridge
of the group than the one that ran it: that bridge would run it a second time. So bridges given
the same SQLite file (WAL mode, ``--dedupe-db``) keep their claims and answers there:

- **claim before the run.** A bridge claims (device, trace id) in one write transaction before
  it calls Triton; a second bridge that gets the same request finds the claim and leaves it to
  the holder, whose answer goes to the device's result topic whoever received the copy.
- **the answer is kept.** The holder stores its answer before publishing it; a redelivery that
  comes later, to any bridge, is answered with those bytes instead of a second run. An
  ``unavailable`` answer is not kept (a resend is served afresh, as in the bridge's own dedupe):
  its claim is released.
- **a dead holder's claim expires.** A holder renews the claims it is working on every third
  of the lease; a bridge that died (kill -9, power) stops renewing, and once the lease has run
  out the next copy of the request, the broker's redelivery or the device's resend, is claimed
  and run by whichever bridge gets it. Nothing is lost; a request whose holder died waits at most a lease.

What this does not cover: bridges on different hosts. SQLite's locking needs one kernel (WAL
mode does not work over NFS or other network file systems), so bridges on several machines
need a shared store with the same three operations (a row per claim with a conditional insert
and a lease column, e.g. PostgreSQL ``INSERT ... ON CONFLICT`` or Redis ``SET NX PX``), which
is not built here. Kept answers are forgotten after ``keep_s``; a copy arriving later than that
runs again, as with the bridge's own bounded dedupe.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Claimed:
    """This bridge holds the request now and runs it; ``taken_from`` names a holder whose
    lease had run out (it died with the request in hand)."""

    taken_from: str | None = None


@dataclass(frozen=True)
class Answered:
    """A bridge of the group answered it already: publish these bytes again."""

    payload: bytes


@dataclass(frozen=True)
class HeldElsewhere:
    """Another bridge holds a live claim on it and will publish its answer."""

    holder: str


Claim = Claimed | Answered | HeldElsewhere

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    device TEXT NOT NULL,
    trace TEXT NOT NULL,
    holder TEXT NOT NULL,
    lease_until REAL NOT NULL,
    answer BLOB,
    at REAL NOT NULL,
    PRIMARY KEY (device, trace)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_at ON claims (at);
"""


class SharedDedupe:
    """The claims and kept answers of the bridges that share one SQLite file.

    Every call is one short transaction on the caller's thread (microseconds; a bridge makes
    two per request), so the bridge calls it from its event loop."""

    def __init__(self, path: str | Path, bridge_id: str, *, lease_s: float = 15.0, keep_s: float = 900.0) -> None:
        """``lease_s``: how long a claim outlives its holder's last renewal. ``keep_s``: how
        long an answer is kept for redeliveries."""
        if lease_s <= 0 or keep_s <= 0:
            raise ValueError("lease_s and keep_s must be positive")
        self.path = Path(path)
        # Unique per run: a restarted bridge must not renew the claims its predecessor died with.
        self.holder = f"{bridge_id}/{os.getpid()}/{secrets.token_hex(4)}"
        self.lease_s = lease_s
        self.keep_s = keep_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Made on one thread and used on the event loop's, one call at a time.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives the process's crash
        self._db.executescript(_SCHEMA)

    def claim(self, device_id: str, trace_id: str) -> Claim:
        """Take (device, trace id) for this bridge, unless it is answered or held by a live claim."""
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # the write lock first: no other bridge reads between
        try:
            row = db.execute(
                "SELECT holder, lease_until, answer FROM claims WHERE device = ? AND trace = ?", (device_id, trace_id)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO claims (device, trace, holder, lease_until, at) VALUES (?, ?, ?, ?, ?)",
                    (device_id, trace_id, self.holder, now + self.lease_s, now),
                )
                outcome: Claim = Claimed()
            else:
                holder, lease_until, answer = row
                if answer is not None:
                    outcome = Answered(bytes(answer))
                elif lease_until > now:
                    outcome = HeldElsewhere(holder)
                else:
                    db.execute(
                        "UPDATE claims SET holder = ?, lease_until = ?, at = ? WHERE device = ? AND trace = ?",
                        (self.holder, now + self.lease_s, now, device_id, trace_id),
                    )
                    outcome = Claimed(taken_from=holder)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return outcome

    def answer(self, device_id: str, trace_id: str, payload: bytes) -> None:
        """Keep the answer for redeliveries. The first answer stays: a holder that stalled past
        its lease and answers after another bridge took the request over does not replace it."""
        self._db.execute(
            "UPDATE claims SET answer = ?, at = ? WHERE device = ? AND trace = ? AND answer IS NULL",
            (payload, time.time(), device_id, trace_id),
        )

    def release(self, device_id: str, trace_id: str) -> None:
        """Give up this bridge's claim without an answer to keep: the next copy runs afresh."""
        self._db.execute(
            "DELETE FROM claims WHERE device = ? AND trace = ? AND holder = ? AND answer IS NULL",
            (device_id, trace_id, self.holder),
        )

    def renew(self, keys: Iterable[tuple[str, str]]) -> None:
        """Extend the lease of the claims this bridge is still working on, (device, trace id)
        each: only those, so a claim whose task ended without an answer cannot outlive it."""
        until = time.time() + self.lease_s
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "UPDATE claims SET lease_until = ? WHERE device = ? AND trace = ? AND holder = ? AND answer IS NULL",
                [(until, device, trace, self.holder) for device, trace in keys],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def prune(self) -> int:
        """Forget answers older than ``keep_s`` and claims abandoned that long; returns how many."""
        return self._db.execute("DELETE FROM claims WHERE at < ?", (time.time() - self.keep_s,)).rowcount

    def close(self) -> None:
        self._db.close()
