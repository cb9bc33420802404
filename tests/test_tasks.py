"""The task state machine: the allowed lives of a frame, and every transition it refuses."""

from __future__ import annotations

import itertools
import time

import pytest

from edgewire.edge.tasks import ALLOWED, TERMINAL, Task, TaskState
from edgewire.errors import EdgewireError, TaskStateError

S = TaskState
ALL_PAIRS = list(itertools.product(TaskState, TaskState))
ALLOWED_PAIRS = [(a, b) for a, b in ALL_PAIRS if b in ALLOWED[a]]
DISALLOWED_PAIRS = [(a, b) for a, b in ALL_PAIRS if b not in ALLOWED[a]]


def new_task(state: TaskState = S.RAW) -> Task:
    return Task(trace_id="run-7", seq=7, source_ref="00007-3.jpg", created=time.time(), state=state)


def test_the_machine_is_the_documented_one() -> None:
    assert set(ALLOWED) == set(TaskState)
    assert set(ALLOWED_PAIRS) == {
        (S.RAW, S.JUDGED),
        (S.JUDGED, S.COMPLETE),
        (S.JUDGED, S.PENDING_CLOUD),
        (S.PENDING_CLOUD, S.COMPLETE),
        (S.PENDING_CLOUD, S.TIMEOUT),
    }
    assert TERMINAL == {S.COMPLETE, S.TIMEOUT}
    assert all(not ALLOWED[t] for t in TERMINAL)
    assert len(DISALLOWED_PAIRS) == len(TaskState) ** 2 - 5


def test_new_task_starts_raw_and_unfinished() -> None:
    task = new_task()
    assert task.state is S.RAW
    assert task.history == []
    assert task.finished is None
    assert not task.done
    assert task.answered_by == "edge" and not task.degraded


def test_local_path_raw_judged_complete() -> None:
    task = new_task()
    task.to(S.JUDGED)
    assert task.state is S.JUDGED
    assert task.finished is None and not task.done
    task.to(S.COMPLETE)
    assert task.state is S.COMPLETE
    assert task.history == [S.RAW, S.JUDGED]
    assert task.done
    assert task.finished is not None and task.finished >= task.created


@pytest.mark.parametrize("end", [S.COMPLETE, S.TIMEOUT])
def test_cloud_path_ends_complete_or_timeout(end: TaskState) -> None:
    task = new_task()
    task.to(S.JUDGED)
    task.to(S.PENDING_CLOUD)
    assert not task.done and task.finished is None
    task.to(end)
    assert task.state is end
    assert task.history == [S.RAW, S.JUDGED, S.PENDING_CLOUD]
    assert task.done
    assert task.finished is not None


@pytest.mark.parametrize(("start", "target"), ALLOWED_PAIRS, ids=lambda s: s.value)
def test_every_allowed_transition_succeeds(start: TaskState, target: TaskState) -> None:
    task = new_task(start)
    task.to(target)
    assert task.state is target
    assert task.history == [start]
    assert (task.finished is not None) == (target in TERMINAL)


@pytest.mark.parametrize(("start", "target"), DISALLOWED_PAIRS, ids=lambda s: s.value)
def test_every_disallowed_transition_raises_and_changes_nothing(start: TaskState, target: TaskState) -> None:
    task = new_task(start)
    before = (task.state, list(task.history), task.finished)
    with pytest.raises(TaskStateError) as info:
        task.to(target)
    message = str(info.value)
    assert "run-7" in message
    assert f"{start.value} -> {target.value}" in message
    assert (task.state, task.history, task.finished) == before


def test_task_state_error_is_an_edgewire_error() -> None:
    assert issubclass(TaskStateError, EdgewireError)


def test_an_answer_arriving_twice_is_refused() -> None:
    task = new_task()
    for state in (S.JUDGED, S.PENDING_CLOUD, S.COMPLETE):
        task.to(state)
    finished = task.finished
    with pytest.raises(TaskStateError):
        task.to(S.COMPLETE)
    with pytest.raises(TaskStateError):
        task.to(S.TIMEOUT)
    assert task.state is S.COMPLETE and task.finished == finished


def test_late_answer_after_timeout_is_refused() -> None:
    task = new_task()
    for state in (S.JUDGED, S.PENDING_CLOUD, S.TIMEOUT):
        task.to(state)
    with pytest.raises(TaskStateError, match="TIMEOUT -> COMPLETE"):
        task.to(S.COMPLETE)
    assert task.state is S.TIMEOUT


def test_latency_is_non_negative_and_frozen_once_finished() -> None:
    task = new_task()
    assert task.latency_ms >= 0.0
    task.to(S.JUDGED)
    time.sleep(0.01)
    running = task.latency_ms
    assert running >= 0.0
    task.to(S.COMPLETE)
    final = task.latency_ms
    assert final >= running
    assert final == pytest.approx((task.finished - task.created) * 1000.0)
    time.sleep(0.01)
    assert task.latency_ms == final


def test_latency_counts_from_creation() -> None:
    task = Task(trace_id="t", seq=0, source_ref="x", created=time.time() - 0.5)
    task.to(S.JUDGED)
    task.to(S.COMPLETE)
    assert 500.0 <= task.latency_ms < 60_000.0


def test_trace_ids_are_random_valid_topic_levels() -> None:
    """A trace id is 128 random bits: no other device can send the next one first."""
    from edgewire import topics
    from edgewire.edge.tasks import new_trace_ids

    ids = new_trace_ids(1000)
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 for i in ids)
    assert all(topics.REQUEST.build(device_id="cam-1", trace_id=i) for i in ids)
    assert new_trace_ids(0) == []


def test_trace_ids_never_repeat_across_reads_or_a_fork() -> None:
    """Ids are read ahead in bulk; a batch never gets one twice, and a forked child reads its
    own rather than the parent's unread ones. The fork happens in a fresh interpreter: forking
    this one, whose earlier tests left threads running (gRPC's among them), is not safe."""
    import subprocess
    import sys

    from edgewire.edge.tasks import new_trace_ids

    ids = [i for _ in range(100) for i in new_trace_ids(16)] + new_trace_ids(700)
    assert len(set(ids)) == len(ids) == 2300
    script = """
import os
from edgewire.edge.tasks import new_trace_ids
new_trace_ids(16)  # the parent has ids read ahead, unread
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child: its next ids, to the parent
    os.close(read)
    os.write(write, "".join(new_trace_ids(4)).encode())
    os._exit(0)
os.close(write)
with os.fdopen(read) as pipe:
    child = pipe.read()
os.waitpid(pid, 0)
print(child, "".join(new_trace_ids(4)))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    child, mine = run.stdout.split()
    theirs, ours = ({ids[i : i + 32] for i in range(0, 128, 32)} for ids in (child, mine))
    assert len(child) == len(mine) == 4 * 32 and len(theirs) == len(ours) == 4
    assert not theirs & ours
