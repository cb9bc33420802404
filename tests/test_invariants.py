"""The outage window of tests/invariants.py on recorded data: where it ends decides which expired
escalations are forgiven, so it must end when the outage's effects were measured gone, not at a
margin, and never later than the first request the outage left behind was served again."""

from __future__ import annotations

from typing import Any

from .invariants import PENDING, Owed, check, outage_window

DEADLINE_S = 5.0


def outcome(
    t: float, trace: str, state: str, *, by: str = "edge", late: bool = False, degraded: bool = False
) -> dict[str, Any]:
    prediction = {"label": "1", "class_index": 1, "confidence": 0.9, "margin": 0.8}
    return {
        "t": t,
        "r": {
            "trace_id": trace,
            "state": state,
            "answered_by": by,
            "late": late,
            "degraded": degraded,
            "prediction": prediction,
        },
    }


def answer(t: float, trace: str, status: str = "ok") -> dict[str, Any]:
    prediction = {"label": "1", "class_index": 1, "confidence": 0.9, "margin": 0.8}
    return {"t": t, "doc": {"trace_id": trace, "status": status, "prediction": prediction}}


def broker_crash(resent_answered_at: float) -> tuple[dict[str, Owed], list[dict[str, Any]], list[dict[str, Any]]]:
    """A broker killed at 100 and its clients back at 107.9 (the bridge last): ``early`` and
    ``dropped`` were sent into the restarted broker before the bridge had subscribed and were
    lost there; the device asks again once a fresh request (``fresh``) is answered, and the
    first request it asked again (``early``) is answered at ``resent_answered_at``. ``dropped``
    reaches its deadline (108.03) before being served."""
    outcomes = [
        outcome(103.0, "early", PENDING),
        outcome(103.03, "dropped", PENDING),
        outcome(107.91, "fresh", PENDING),
        outcome(107.915, "fresh", "COMPLETE", by="cloud"),
        outcome(103.0 + DEADLINE_S, "dropped", "TIMEOUT", degraded=True),
        outcome(resent_answered_at, "early", "COMPLETE", by="cloud"),
    ]
    answers = [answer(107.915, "fresh"), answer(resent_answered_at, "early")]
    owed = {
        "early": Owed("early", "answered", 103.0 + DEADLINE_S + 0.5, PENDING),
        "dropped": Owed("dropped", "expired", 103.03 + DEADLINE_S, PENDING),
        "fresh": Owed("fresh", "answered", 107.91 + DEADLINE_S, PENDING),
    }
    return owed, outcomes, answers


def test_the_window_runs_until_a_request_the_outage_left_behind_is_served_again() -> None:
    owed, outcomes, answers = broker_crash(resent_answered_at=108.06)
    window = outage_window(100.0, 107.9, outcomes, answers)
    assert (window.start, window.end) == (100.0, 108.06)
    found = check(owed, 0, outcomes, answers, [window])
    assert (found.ended_in_outage, found.expired_outside_outage, found.answered_ok) == (1, 0, 2), found.problems


def test_an_escalation_that_expires_after_the_outage_left_overs_were_served_is_a_loss() -> None:
    # The first request asked again was answered before ``dropped``'s deadline: it could have been too.
    owed, outcomes, answers = broker_crash(resent_answered_at=108.0)
    window = outage_window(100.0, 107.9, outcomes, answers)
    assert window.end == 108.0
    found = check(owed, 0, outcomes, answers, [window])
    assert found.expired_outside_outage == 1 and "dropped" in found.problems[0], found.problems


def test_with_nothing_left_behind_the_window_ends_at_the_first_fresh_answer() -> None:
    outcomes = [
        outcome(101.0, "before", PENDING),
        outcome(101.0 + DEADLINE_S, "before", "TIMEOUT", degraded=True),
        outcome(107.91, "fresh", PENDING),
        outcome(107.915, "fresh", "COMPLETE", by="cloud"),
        outcome(108.2, "later", PENDING),
        outcome(108.25, "later", "COMPLETE", by="cloud"),
    ]
    answers = [answer(107.915, "fresh"), answer(108.25, "later")]
    assert outage_window(100.0, 107.9, outcomes, answers).end == 107.915


def test_an_identical_outcome_published_again_after_a_restart_is_a_redelivery_not_a_duplicate() -> None:
    owed = {"t": Owed("t", "answered", 100.0 + DEADLINE_S, PENDING)}
    answers = [answer(100.5, "t")]
    final = outcome(100.6, "t", "COMPLETE", by="cloud")
    again = {**final, "t": 102.0}
    # Published, then the device died before recording that; its next start (101) sends it again.
    found = check(owed, 0, [outcome(100.0, "t", PENDING), final, again], answers, restarts=[101.0])
    assert (found.duplicates, found.redelivered, found.answered_ok) == (0, 1, 1), found.problems
    # The same outcome twice within one run is a duplicate ...
    found = check(owed, 0, [outcome(100.0, "t", PENDING), final, again], answers, restarts=[103.0])
    assert (found.duplicates, found.redelivered) == (1, 0), found.problems
    # ... and so is a different one after a restart.
    other = outcome(102.0, "t", "COMPLETE", by="cloud", late=True)
    found = check(owed, 0, [outcome(100.0, "t", PENDING), final, other], answers, restarts=[101.0])
    assert (found.duplicates, found.redelivered) == (1, 0), found.problems
