"""The exact invariants every fault must keep, checked from what the parts recorded.

One checker for every fault test and the chaos soak (bench/soak.py), so a fault cannot pass by
being checked more loosely than another. Its input is plain data: the device's durable outbox
(the ``owed`` table is the list of escalations it accepted), every outcome the device decided,
every answer that reached the broker on ``result/``, how many requests the bridges ran and how
many inferences Triton did, and the measured outage windows. Its output counts what a fault may
never cause:

* ``lost``: an accepted escalation with no final outcome, or still owed, or still queued;
* ``duplicates``: an escalation with two final (or two late) outcomes, a request the bridges ran
  twice, an inference Triton did twice. An outcome the device published again after a restart,
  identical to the one before it, is a redelivery (``redelivered``), not a duplicate: a crash
  after an outcome went out and before the device recorded that it had leaves it to be published
  once more, and a consumer that dedupes by trace id sees it once;
* ``expired_outside_outage``: an escalation that ended without the cloud's answer although its
  deadline (or the failed answer) fell outside every measured outage window.

A window runs from the moment the fault began to the moment the system was measured whole again:
a request made after the faulted part was back answered ``ok``, and the first of the requests the
outage left waiting answered ``ok`` too (:func:`outage_window`). Nothing is a fraction: each
trace either fits the rule or is named.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PENDING = "PENDING_CLOUD"


@dataclass(frozen=True)
class Owed:
    """An escalation as the device's outbox recorded it."""

    key: str
    state: str  # waiting, answered, expired
    deadline: float
    first_state: str  # the frame's first outcome: PENDING_CLOUD (waited for) or COMPLETE (queued degraded)


def read_outbox(db: Path) -> tuple[dict[str, Owed], int]:
    """Every escalation the outbox accepted, and how many messages it still holds."""
    from edgewire import envelopes as env

    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        rows = conn.execute("SELECT key, state, deadline, note FROM owed").fetchall()
        queued = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    owed = {k: Owed(k, s, float(d), env.decode(env.LocalResults, bytes(n)).results[0].state) for k, s, d, n in rows}
    return owed, queued


@dataclass(frozen=True)
class Window:
    start: float
    end: float

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


def outage_window(
    fault_start: float, fault_end: float, outcomes: list[dict[str, Any]], answers: list[dict[str, Any]]
) -> Window:
    """From the fault's start to the moment the system was measured whole again. ``fault_end``
    is when the faulted part was measured back (its presence birth, the link up), not when a
    restart command returned; from there the window runs on until both of these happened:

    1. a request first decided after ``fault_end`` made the whole trip (its first ``ok`` answer);
    2. if escalations decided before ``fault_end`` were still waiting at that moment (requests a restarted broker
       took with no bridge subscribed and dropped, or a cut link never carried, which the device
       asks again when a newer request is answered), the first of them answered ``ok``. Before
       that moment no request the outage left behind had been served, so a deadline that fell
       earlier fell in the outage; one that fell later and still ended without the cloud's
       answer is a loss.

    Both moments are measured, never a margin. ``outcomes`` carry ``t`` (when the device decided
    them) and ``r`` (the outcome); ``answers`` carry ``t`` and ``doc`` (the bridge's Result)."""
    first_seen: dict[str, float] = {}
    ended: dict[str, float] = {}  # when the device stopped waiting: a final outcome, or a late one
    for o in outcomes:
        trace, r = o["r"]["trace_id"], o["r"]
        first_seen.setdefault(trace, o["t"])
        if r["late"] or (r["state"] != PENDING and not r["degraded"]) or r["state"] == "TIMEOUT":
            ended.setdefault(trace, o["t"])
    answered: dict[str, float] = {}
    answered_ok: dict[str, float] = {}
    for a in sorted(answers, key=lambda a: a["t"]):
        answered.setdefault(a["doc"]["trace_id"], a["t"])
        if a["doc"]["status"] == "ok":
            answered_ok.setdefault(a["doc"]["trace_id"], a["t"])
    fresh = [t for trace, t in answered_ok.items() if t >= fault_end and first_seen.get(trace, 0.0) >= fault_end]
    if not fresh:
        raise AssertionError(
            f"the system never came back after the fault ({fault_start:.1f} to {fault_end:.1f}): no fresh request "
            f"was answered ok ({sum(1 for t in first_seen.values() if t >= fault_end)} fresh escalations, "
            f"{len(answers)} answers)"
        )
    whole = min(fresh)
    left_waiting = [
        trace
        for trace, seen in first_seen.items()
        if fault_start <= seen < fault_end and answered.get(trace, whole) >= whole and ended.get(trace, whole) >= whole
    ]
    served_again = [answered_ok[t] for t in left_waiting if t in answered_ok]
    return Window(fault_start, max(whole, min(served_again)) if served_again else whole)


@dataclass
class Verdict:
    escalations: int = 0
    answered_ok: int = 0
    ended_in_outage: int = 0
    lost: int = 0
    duplicates: int = 0
    expired_outside_outage: int = 0
    still_queued: int = 0
    reruns: int = 0
    redelivered: int = 0
    problems: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "problems"}

    def assert_exact(self) -> None:
        assert not self.problems and self.lost == self.duplicates == self.expired_outside_outage == 0, (
            f"{self.figures()}\n" + "\n".join(self.problems[:30])
        )


def check(
    owed: dict[str, Owed],
    queued: int,
    outcomes: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    windows: Iterable[Window] = (),
    *,
    bridge_runs: float | None = None,
    triton_inferences: float | None = None,
    reruns_allowed: int = 0,
    restarts: Iterable[float] = (),
) -> Verdict:
    """Count what the run broke (see the module's doc). ``outcomes``: the device's decisions,
    ``{"t", "r": LocalResult}``, in the order it made them (across restarts); ``answers``: what
    reached ``result/``, ``{"t", "doc": Result}``; ``bridge_runs``: requests the bridges ran
    (``requests_total`` summed); ``triton_inferences``: inferences Triton did over the run;
    ``reruns_allowed``: requests a killed bridge may have run and not answered (those in flight
    when it died; the broker gives them to the next bridge, which runs them again);
    ``restarts``: when the device started again."""
    v = Verdict(escalations=len(owed), still_queued=queued)
    ok_taken: set[str] = set()
    windows = list(windows)
    restarts = list(restarts)
    by_trace: dict[str, list[dict[str, Any]]] = {}
    timed: dict[str, list[dict[str, Any]]] = {}
    for o in outcomes:
        earlier = timed.setdefault(o["r"]["trace_id"], [])
        if any(e["r"] == o["r"] and any(e["t"] < s <= o["t"] for s in restarts) for e in earlier):
            v.redelivered += 1
            continue
        earlier.append(o)
        by_trace.setdefault(o["r"]["trace_id"], []).append(o["r"])
    first_answer: dict[str, dict[str, Any]] = {}
    first_ok: dict[str, dict[str, Any]] = {}
    for a in sorted(answers, key=lambda a: a["t"]):
        first_answer.setdefault(a["doc"]["trace_id"], {**a["doc"], "seen": a["t"]})
        if a["doc"]["status"] == "ok":
            # A queued request answered `unavailable` is asked again: its ok answer is the one taken.
            first_ok.setdefault(a["doc"]["trace_id"], {**a["doc"], "seen": a["t"]})

    if queued:
        v.lost += queued
        v.problems.append(f"the outbox still holds {queued} messages after the quiet period")
    for key, row in owed.items():
        rs = by_trace.get(key, [])
        on_time = [r for r in rs if r["state"] != PENDING and not r["late"]]
        late = [r for r in rs if r["late"]]
        if row.state == "waiting":
            v.lost += 1
            v.problems.append(f"{key}: still owed an answer (deadline {row.deadline:.1f})")
            continue
        if row.first_state == PENDING:
            # Waited for: one outcome ends it, on time, or late when a restart cut the wait short.
            finals = on_time + late
            if not finals:
                v.lost += 1
                v.problems.append(f"{key}: settled {row.state} but the device never decided its outcome")
                continue
            if len(finals) > 1:
                v.duplicates += len(finals) - 1
                v.problems.append(f"{key}: {len(finals)} final outcomes: {[(r['state'], r['late']) for r in finals]}")
            final = finals[0]
        else:
            # Queued while degraded: answered at once, the cloud's answer at most once later.
            if len(on_time) > 1 or len(late) > 1:
                v.duplicates += max(len(on_time) - 1, 0) + max(len(late) - 1, 0)
                v.problems.append(f"{key}: {len(on_time)} outcomes and {len(late)} late ones")
            final = late[0] if late else None
        answer = first_ok.get(key) or first_answer.get(key)
        # The cloud's answer taken: the owed row flipped by an answer and the outcome made from
        # it (the device's record; the broker's copy may be missing after a broker crash).
        cloud_ok = row.state == "answered" and final is not None and final["answered_by"] == "cloud"
        if cloud_ok:
            v.answered_ok += 1
            ok_taken.add(key)
            if answer is not None and (answer["status"] != "ok" or final["prediction"] != answer["prediction"]):
                v.problems.append(f"{key}: the device took {final['prediction']} for the cloud's {answer}")
            continue
        # Ended without the cloud's answer: only when its deadline, or its failed answer, fell
        # inside an outage.
        moments = [row.deadline] + ([answer["seen"]] if answer is not None else [])
        if any(w.holds(t) for w in windows for t in moments):
            v.ended_in_outage += 1
        else:
            v.expired_outside_outage += 1
            status = answer["status"] if answer is not None else "no answer"
            v.problems.append(
                f"{key}: ended {row.state} ({status}) with its deadline {row.deadline:.2f} outside every outage "
                f"{[(round(w.start, 2), round(w.end, 2)) for w in windows]}"
            )
    stray = set(by_trace) - set(owed)
    hard_unrecorded = [t for t in stray if by_trace[t][0]["state"] == PENDING]
    if hard_unrecorded:
        v.lost += len(hard_unrecorded)
        v.problems.append(
            f"{len(hard_unrecorded)} frames waited for the cloud with no escalation recorded: {hard_unrecorded[:5]}"
        )

    # No request ran twice: the bridges' runs and Triton's inferences against distinct requests.
    distinct = set(first_answer) | {k for k, row in owed.items() if row.state == "answered"}
    if distinct - set(owed):
        v.problems.append(f"answers for requests the device never recorded: {sorted(distinct - set(owed))[:5]}")
    if bridge_runs is not None and bridge_runs > len(distinct):
        v.reruns += int(bridge_runs - len(distinct))
    ok = len({k for k, a in first_answer.items() if a["status"] == "ok"} | ok_taken)
    if triton_inferences is not None and triton_inferences > ok:
        v.reruns = max(v.reruns, int(triton_inferences - ok))
    if v.reruns > reruns_allowed:
        v.duplicates += v.reruns - reruns_allowed
        v.problems.append(
            f"requests ran more than once: bridges {bridge_runs}, Triton {triton_inferences} for {len(distinct)} "
            f"distinct requests ({ok} ok), {reruns_allowed} reruns allowed"
        )
    return v


async def until_quiet(observe: Callable[[], Hashable], *, quiet_s: float, timeout: float, step: float = 0.25) -> bool:
    """Wait until what ``observe`` returns has not changed for ``quiet_s`` (listen until quiet,
    not until a count is reached: a late duplicate must have the time to show up). False if the
    parts were still talking after ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = observe(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
        now = observe()
        if now != last:
            last, since = now, time.monotonic()
    return True
