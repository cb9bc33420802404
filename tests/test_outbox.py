"""The durable outbox: order, bounds and policies, expiry, and survival of kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgewire.edge.outbox import OVERTAKEN_AFTER_S, Outbox, OutboxEntry, OutboxFull


def msg(i: int, priority: int = 0, deadline: float | None = None) -> OutboxEntry:
    return OutboxEntry(topic=f"req/cam/{i}", payload=b"x" * 100, priority=priority, deadline=deadline)


def test_fifo_ack_and_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.db")
    ids = box.put_many(msg(i) for i in range(10))
    assert [i.topic for i in box.peek(3)] == ["req/cam/0", "req/cam/1", "req/cam/2"]
    box.ack(ids[:4])
    assert len(box) == 6
    box.close()
    again = Outbox(tmp_path / "q.db")
    assert len(again) == 6 and again.peek(1)[0].id == ids[4]
    assert again.bytes == 6 * (100 + len("req/cam/4"))


def test_drop_oldest_counts_its_drops(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.db", max_count=5, policy="drop_oldest")
    box.put_many(msg(i) for i in range(8))
    assert [i.topic for i in box.peek(10)] == [f"req/cam/{i}" for i in range(3, 8)]
    assert box.meter.get("outbox_dropped_total", reason="drop_oldest") == 3


def test_drop_lowest_priority_keeps_what_matters(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.db", max_count=3, policy="drop_lowest_priority")
    box.put_many([msg(0, priority=5), msg(1, priority=0), msg(2, priority=9), msg(3, priority=1)])
    assert sorted(i.priority for i in box.peek(10)) == [1, 5, 9]


def test_refuse_when_full_and_bytes_bound(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.db", max_count=100, max_bytes=350, policy="refuse")
    box.put_many(msg(i) for i in range(3))
    with pytest.raises(OutboxFull, match="policy is refuse"):
        box.put(msg(3))
    assert len(box) == 3  # the refused message changed nothing


def test_expire_removes_past_deadline(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.db")
    now = time.time()
    box.put_many([msg(0, deadline=now - 1), msg(1, deadline=now + 60), msg(2)])
    gone = box.expire(now)
    assert [i.topic for i in gone] == ["req/cam/0"]
    assert len(box) == 2 and box.meter.get("outbox_dropped_total", reason="expired") == 1


WRITER = """
import sys
from edgewire.edge.outbox import OutboxEntry, Outbox
box = Outbox(sys.argv[1])
n = 0
while True:
    box.put_many(OutboxEntry(topic=f"req/cam/{n + k}", payload=b"y" * 200) for k in range(10))
    n += 10
    print(n, flush=True)
"""


def test_committed_messages_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    committed = 0
    while committed < 500:
        committed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    box = Outbox(db)
    assert len(box) >= committed  # everything a commit returned for is there
    topics = [i.topic for i in box.peek(len(box))]
    assert topics == [f"req/cam/{k}" for k in range(len(topics))]  # in order, no holes
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def owed(i: int, deadline: float) -> OutboxEntry:
    return OutboxEntry(topic=f"req/cam/t{i}", payload=b"r" * 50, deadline=deadline, key=f"t{i}", note=b"n")


def test_owed_messages_stay_until_answered_and_go_again_when_overdue(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.db")
    now = time.time()
    ids = box.put_many([owed(0, now + 60), owed(1, now + 60), msg(2)])
    box.sent(ids, now=now)
    # The broker has all three: the plain one is gone, the owed ones wait for their answers.
    assert len(box) == 2 and box.peek(10) == []
    assert box.settle_many([("t0", "answered")]) == [True]
    assert len(box) == 1
    assert box.resend(older_than_s=5, now=now + 1) == 0  # not overdue yet
    assert box.resend(older_than_s=5, now=now + 6) == 1
    assert [i.topic for i in box.peek(10)] == ["req/cam/t1"]
    box.sent([ids[1]], now=now + 6)
    assert box.resend(older_than_s=5, now=now + 12) == 0  # second attempt waits twice as long
    assert box.resend(older_than_s=5, now=now + 17) == 1
    box.sent([ids[1]], now=now + 17)
    assert box.resend() == 1  # after a reconnect: everything unanswered goes again
    assert box.settle_many([("t1", "answered"), ("t1", "answered")]) == [True, False]  # the duplicate
    assert len(box) == 0 and box.waiting() == 0


def test_a_dropped_request_is_no_longer_owed(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "q.db", max_count=2, policy="drop_oldest")
    now = time.time()
    box.put_many([owed(i, now + 60) for i in range(3)])
    assert box.state_of("t0") == "expired" and box.state_of("t2") == "waiting"
    assert box.waiting() == 2


def test_a_request_overtaken_by_an_answered_one_goes_again_at_once(tmp_path: Path) -> None:
    """A broker that lost its sessions drops what arrives before the bridge subscribes again;
    an answer to a later request shows the path works, so the earlier one goes again now, not
    after the resend timer (which may be longer than its deadline)."""
    box = Outbox(tmp_path / "q.db")
    now = time.time()
    ids = box.put_many([owed(0, now + 60), owed(1, now + 60), owed(2, now + 60)])
    box.sent(ids[:1], now=now)  # lost on the way
    box.sent(ids[1:2], now=now + OVERTAKEN_AFTER_S * 0.5)  # in flight, answers may come back out of order
    box.sent(ids[2:], now=now + OVERTAKEN_AFTER_S * 1.5)
    assert box.peek(10) == []
    assert box.settle_many([("t2", "answered")]) == [True]
    assert [e.topic for e in box.peek(10)] == ["req/cam/t0"]
    assert box.meter.total("outbox_resent_total") == 1
    # An expiry is no sign that the path works: nothing goes again for it.
    box.sent(ids[:1], now=now + OVERTAKEN_AFTER_S * 3)
    assert box.settle_many([("t1", "expired")]) == [True] and box.peek(10) == []


def test_an_outcome_stored_with_its_flip_stays_until_published(tmp_path: Path) -> None:
    """The flip and the outcome it decided are one commit: a crash before the outcome went out
    leaves it stored for the next start, and a settled row is not forgotten while it holds one."""
    path = tmp_path / "q.db"
    box = Outbox(path)
    now = time.time()
    box.put_many([owed(0, now + 60), owed(1, now + 60), owed(2, now + 60)])
    decided = {"t0": b"zero", "t1": b"one"}
    assert box.settle_many([("t0", "answered"), ("t1", "expired"), ("t2", "answered")], decided=decided) == [
        True,
        True,
        True,
    ]
    # A duplicate flips nothing and stores nothing.
    assert box.settle_many([("t0", "answered")], decided={"t0": b"again"}) == [False]
    box.close()
    box = Outbox(path)  # what a restart finds
    assert box.unpublished_outcomes() == [("t0", b"zero"), ("t1", b"one")]
    assert box.forget_settled(-1.0) == 1  # only t2, whose outcome is out
    box.outcomes_published(["t0"])
    assert box.unpublished_outcomes() == [("t1", b"one")]
    assert box.state_of("t0") == "answered"
    box.outcomes_published(["t1"])
    assert box.unpublished_outcomes() == [] and box.forget_settled(-1.0) == 2


def test_an_outbox_from_before_stored_outcomes_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.executescript(
            "CREATE TABLE owed (key TEXT PRIMARY KEY, deadline REAL NOT NULL, note BLOB NOT NULL, "
            "state TEXT NOT NULL DEFAULT 'waiting', settled REAL);"
            "INSERT INTO owed (key, deadline, note) VALUES ('t9', 1e12, x'00');"
        )
    box = Outbox(path)
    assert box.settle_many([("t9", "answered")], decided={"t9": b"nine"}) == [True]
    assert box.unpublished_outcomes() == [("t9", b"nine")]
