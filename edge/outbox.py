"""The device's durable outbox: messages that must not be lost wait here until acknowledged,
and the escalations still owed an answer are remembered here until they get one.

SQLite in WAL mode: an append is one row, a commit is one WAL write plus (synchronous=FULL) one
fsync, so whatever a commit returned for survives kill -9 and power loss. Concurrent appends
share one transaction (group commit), which is what makes thousands per second affordable on a
device's flash storage. The queue is bounded by count, bytes and age, with an explicit policy
when full; every drop is counted by reason.

The ``owed`` table is what makes the device's side exactly-once: an escalation is recorded in
the same transaction as its request, and an answer is taken only by flipping its row from
``waiting`` to ``answered`` -- a redelivered or duplicated answer finds nothing to flip, even
after a restart. The flip stores the final outcome it decided, cleared once that outcome is
published: a crash between the two leaves it stored, and the next start publishes it, the same
bytes, so no escalation ends without its outcome (a consumer that dedupes by trace id sees it
once).

A message owed an answer stays in the outbox after the broker acknowledged it, marked sent,
until its answer is settled: a broker's PUBACK does not mean a bridge has it (a broker restart
can lose a shared subscription, a bridge can stop between taking and answering). Such a message
is sent again after a reconnect or when it has waited too long, and the bridge's dedupe by
trace_id makes the resend harmless. It is also sent again, at once, when an answer comes for a
request sent more than :data:`OVERTAKEN_AFTER_S` after it: the path works, so this one was lost
on the way (a broker restarted without its sessions drops what arrives before the bridge has
subscribed again), and waiting for the resend timer would let its deadline pass.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgewire.errors import EdgewireError
from edgewire.metrics import Meter

Policy = Literal["drop_oldest", "drop_lowest_priority", "refuse"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    created REAL NOT NULL,
    deadline REAL,
    size INTEGER NOT NULL,
    key TEXT,
    sent REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_priority ON outbox (priority, id);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent IS NULL;
CREATE INDEX IF NOT EXISTS outbox_key ON outbox (key);
CREATE TABLE IF NOT EXISTS owed (
    key TEXT PRIMARY KEY,
    deadline REAL NOT NULL,
    note BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',
    settled REAL,
    outcome BLOB
);
CREATE INDEX IF NOT EXISTS owed_waiting ON owed (state, deadline);
"""

OwedState = Literal["waiting", "answered", "expired"]

#: An unanswered request sent this much earlier than one just answered was lost on the way
#: (answers from a working path come back within this of their order).
OVERTAKEN_AFTER_S = 1.0


class OutboxFull(EdgewireError):
    """The outbox is at its bound and its policy is to refuse new messages.

    ``accepted`` holds the ids of the leading messages of the batch that did fit and were kept."""

    def __init__(self, message: str, accepted: list[int] | None = None) -> None:
        super().__init__(message)
        self.accepted = accepted or []


@dataclass(frozen=True)
class QueuedEntry:
    """An entry as the outbox holds it: with its row id, to acknowledge it by."""

    id: int
    topic: str
    payload: bytes
    qos: int
    priority: int
    created: float
    deadline: float | None


@dataclass(frozen=True)
class OutboxEntry:
    """What is handed to :meth:`Outbox.put_many`: a message to deliver, perhaps owed an answer."""

    topic: str
    payload: bytes
    qos: int = 1
    priority: int = 0
    deadline: float | None = None
    #: When set, the message is owed an answer: ``key`` (the trace id) and ``note`` (what the
    #: device needs to finish the work when the answer arrives, even after a restart) are
    #: recorded with it, until ``deadline`` (required then).
    key: str | None = None
    note: bytes | None = None


class Outbox:
    def __init__(
        self,
        path: str | Path,
        *,
        max_count: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        max_age_s: float = 7 * 86_400,
        policy: Policy = "drop_oldest",
        durable: bool = True,
        meter: Meter | None = None,
    ) -> None:
        self.path = str(path)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.policy = policy
        self.meter = meter or Meter("outbox")
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit is fsynced before it returns; OFF only for the in-memory baseline.
        self._synchronous = "FULL" if durable else "OFF"
        self._db.execute(f"PRAGMA synchronous={self._synchronous}")
        self._db.executescript(_SCHEMA)
        # An outbox written before outcomes were stored with their flip gains the column.
        if "outcome" not in {row[1] for row in self._db.execute("PRAGMA table_info(owed)")}:
            self._db.execute("ALTER TABLE owed ADD COLUMN outcome BLOB")
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, one fsync at its commit; on any error it is rolled back and the
        cached count and size are read again."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._recount()
            raise

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, message: OutboxEntry) -> int:
        return self.put_many([message])[0]

    def put_many(self, messages: Iterable[OutboxEntry]) -> list[int]:
        """Append in one transaction (one fsync); returns their ids in order.

        Under the refuse policy the messages that fit are kept and OutboxFull names them."""
        batch = list(messages)
        now = time.time()
        ids: list[int] = []
        refused: OutboxFull | None = None
        with self._transaction():
            for m in batch:
                size = len(m.payload) + len(m.topic)
                try:
                    self._make_room(size, now)
                except OutboxFull as exc:
                    refused = OutboxFull(f"{len(batch) - len(ids)} of {len(batch)} refused: {exc}", ids)
                    break
                cur = self._db.execute(
                    "INSERT INTO outbox (topic, payload, qos, priority, created, deadline, size, key) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (m.topic, m.payload, m.qos, m.priority, now, m.deadline, size, m.key),
                )
                ids.append(int(cur.lastrowid or 0))
                self._count += 1
                self._bytes += size
                if m.key is not None:
                    if m.deadline is None or m.note is None:
                        raise ValueError(f"message {m.key} is owed an answer but has no deadline or note")
                    self._db.execute(
                        "INSERT OR IGNORE INTO owed (key, deadline, note) VALUES (?, ?, ?)", (m.key, m.deadline, m.note)
                    )
        self.meter.set("outbox_depth", self._count)
        if ids:
            self.meter.inc("outbox_enqueued_total", len(ids))
        if refused is not None:
            self.meter.inc("outbox_dropped_total", len(batch) - len(ids), reason="refuse")
            raise refused
        return ids

    def _make_room(self, size: int, now: float) -> None:
        while self._count + 1 > self.max_count or self._bytes + size > self.max_bytes:
            if self.policy == "refuse" or self._count == 0:
                raise OutboxFull(
                    f"outbox full ({self._count} messages, {self._bytes} bytes; bounds {self.max_count}, "
                    f"{self.max_bytes}) and its policy is {self.policy}"
                )
            order = "priority ASC, id ASC" if self.policy == "drop_lowest_priority" else "id ASC"
            victim = self._db.execute(f"SELECT id, size, key FROM outbox ORDER BY {order} LIMIT 1").fetchone()
            self._db.execute("DELETE FROM outbox WHERE id = ?", (victim[0],))
            if victim[2] is not None:
                # A dropped request will never be answered: its frame keeps its local answer.
                self._db.execute(
                    "UPDATE owed SET state = 'expired', settled = ? WHERE key = ? AND state = 'waiting'",
                    (now, victim[2]),
                )
            self._count -= 1
            self._bytes -= int(victim[1])
            self.meter.inc("outbox_dropped_total", reason=self.policy)

    def peek(self, limit: int) -> list[QueuedEntry]:
        """The oldest ``limit`` messages not yet handed to the broker, in the order they were put."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, priority, created, deadline FROM outbox WHERE sent IS NULL "
            "ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        return [QueuedEntry(int(r[0]), r[1], bytes(r[2]), int(r[3]), int(r[4]), float(r[5]), r[6]) for r in rows]

    def ack(self, ids: Iterable[int]) -> None:
        """Forget messages the broker has acknowledged."""
        keys = [(i,) for i in ids]
        if not keys:
            return
        with self._transaction():
            self._db.executemany("DELETE FROM outbox WHERE id = ?", keys)
        self._recount()
        self.meter.set("outbox_depth", self._count)

    def sent(self, ids: Iterable[int], now: float | None = None) -> None:
        """The broker has these: forget those owed nothing, keep the rest until their answer."""
        keys = [(i,) for i in ids]
        if not keys:
            return
        now = time.time() if now is None else now
        with self._transaction():
            # Owed nothing, or its answer is settled already (a late request forwarded for audit).
            self._db.executemany(
                "DELETE FROM outbox WHERE id = ? AND (key IS NULL OR NOT EXISTS "
                "(SELECT 1 FROM owed WHERE owed.key = outbox.key AND owed.state = 'waiting'))",
                keys,
            )
            self._db.executemany(
                "UPDATE outbox SET sent = ?, attempts = attempts + 1 WHERE id = ?", [(now, i) for (i,) in keys]
            )
        self._recount()
        self.meter.set("outbox_depth", self._count)

    def resend(self, *, older_than_s: float | None = None, now: float | None = None) -> int:
        """Mark sent-but-unanswered messages to go again: all of them (after a reconnect), or those
        sent more than ``older_than_s`` ago, doubled per attempt so a long outage does not churn."""
        now = time.time() if now is None else now
        if older_than_s is None:
            cur = self._db.execute("UPDATE outbox SET sent = NULL WHERE sent IS NOT NULL")
        else:
            cur = self._db.execute(
                "UPDATE outbox SET sent = NULL WHERE sent IS NOT NULL AND sent < ? - ? * (1 << MIN(attempts - 1, 5))",
                (now, older_than_s),
            )
        if cur.rowcount:
            self.meter.inc("outbox_resent_total", cur.rowcount)
        return cur.rowcount

    def expire(self, now: float | None = None, *, deadlines: bool = True) -> list[QueuedEntry]:
        """Remove and return messages older than max_age_s and, with ``deadlines``, those past
        their deadline (without it, late messages stay to be forwarded for audit)."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, priority, created, deadline FROM outbox "
            "WHERE (? AND deadline IS NOT NULL AND deadline < ?) OR created < ? ORDER BY id",
            (int(deadlines), now, now - self.max_age_s),
        ).fetchall()
        items = [QueuedEntry(int(r[0]), r[1], bytes(r[2]), int(r[3]), int(r[4]), float(r[5]), r[6]) for r in rows]
        if items:
            self.ack(i.id for i in items)
            self.meter.inc("outbox_dropped_total", len(items), reason="expired")
        return items

    # -- answers owed -------------------------------------------------------------------------

    def settle_many(
        self,
        outcomes: Iterable[tuple[str, OwedState]],
        *,
        keep_unsent: bool = False,
        decided: Mapping[str, bytes] | None = None,
    ) -> list[bool]:
        """Flip owed rows out of ``waiting`` in one transaction; True where this call did it.

        False means the answer was already taken (a duplicate), expired, or never owed. The
        request goes too, unless ``keep_unsent`` and it never left (a late one kept for audit).
        ``decided`` holds the final outcome each flip decides: stored with the flip, it stays
        until :meth:`outcomes_published` (see :meth:`unpublished_outcomes`)."""
        pairs = list(outcomes)
        decided = decided or {}
        now = time.time()
        done: list[bool] = []
        overtaken: float | None = None
        with self._transaction():
            for key, state in pairs:
                cur = self._db.execute(
                    "UPDATE owed SET state = ?, settled = ?, outcome = ? WHERE key = ? AND state = 'waiting'",
                    (state, now, decided.get(key), key),
                )
                done.append(cur.rowcount == 1)
                if state == "answered":
                    row = self._db.execute("SELECT MAX(sent) FROM outbox WHERE key = ?", (key,)).fetchone()
                    if row[0] is not None:
                        overtaken = max(overtaken or 0.0, float(row[0]))
                # Answered or given up on: the request need not go (again).
                self._db.execute("DELETE FROM outbox WHERE key = ? AND (? OR sent IS NOT NULL)", (key, not keep_unsent))
            lost = 0
            if overtaken is not None:
                lost = self._db.execute(
                    "UPDATE outbox SET sent = NULL WHERE sent IS NOT NULL AND key IS NOT NULL AND sent < ?",
                    (overtaken - OVERTAKEN_AFTER_S,),
                ).rowcount
        if lost:
            self.meter.inc("outbox_resent_total", lost)
        self._recount()
        self.meter.set("outbox_depth", self._count)
        return done

    def outcomes_published(self, keys: Iterable[str]) -> None:
        """The stored outcomes of ``keys`` are out: forget them. Not fsynced: kill -9 cannot lose
        this commit, and one lost to a power cut only publishes those outcomes once more."""
        relaxed = self._synchronous == "FULL"
        if relaxed:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._transaction():
                self._db.executemany("UPDATE owed SET outcome = NULL WHERE key = ?", ((k,) for k in keys))
        finally:
            if relaxed:
                self._db.execute("PRAGMA synchronous=FULL")

    def unpublished_outcomes(self) -> list[tuple[str, bytes]]:
        """Final outcomes decided and stored but not known to be published, in the order decided."""
        rows = self._db.execute("SELECT key, outcome FROM owed WHERE outcome IS NOT NULL ORDER BY settled, rowid")
        return [(r[0], bytes(r[1])) for r in rows.fetchall()]

    def retry_later(self, keys: Iterable[str], *, ahead_s: float) -> list[bool]:
        """Keep owed the requests the cloud could not serve yet whose deadline is more than
        ``ahead_s`` away; True where kept. Their request stays in the outbox as sent, so the
        forwarder's resend (``resend_after_s``, doubling per attempt) asks again."""
        now = time.time()
        kept: list[bool] = []
        for key in keys:
            row = self._db.execute(
                "SELECT 1 FROM owed WHERE key = ? AND state = 'waiting' AND deadline > ? "
                "AND EXISTS (SELECT 1 FROM outbox WHERE outbox.key = owed.key)",
                (key, now + ahead_s),
            ).fetchone()
            kept.append(row is not None)
        return kept

    def notes_of(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The notes of those of ``keys`` still owed an answer."""
        notes = {}
        for key in keys:
            row = self._db.execute("SELECT note FROM owed WHERE key = ? AND state = 'waiting'", (key,)).fetchone()
            if row is not None:
                notes[key] = bytes(row[0])
        return notes

    def state_of(self, key: str) -> OwedState | None:
        row = self._db.execute("SELECT state FROM owed WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def overdue(self, now: float | None = None) -> list[str]:
        """The keys of answers still waiting past their deadline (e.g. the device was down when
        it passed), the earliest first."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT key FROM owed WHERE state = 'waiting' AND deadline < ? ORDER BY deadline", (now,)
        ).fetchall()
        return [r[0] for r in rows]

    def waiting(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM owed WHERE state = 'waiting'").fetchone()[0])

    def forget_settled(self, older_than_s: float) -> int:
        """Drop settled rows once no duplicate of their answer can still arrive (and their
        outcome is out)."""
        cur = self._db.execute(
            "DELETE FROM owed WHERE state != 'waiting' AND outcome IS NULL AND settled < ?",
            (time.time() - older_than_s,),
        )
        return cur.rowcount

    def _recount(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
