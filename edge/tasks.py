"""The life of one frame, as an explicit state machine.

RAW -> JUDGED -> COMPLETE, or JUDGED -> PENDING_CLOUD -> COMPLETE | TIMEOUT. Making the
transitions explicit means an answer that arrives twice, or after the deadline, is refused
by the machine rather than by scattered checks.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass, field

from edgewire.envelopes import Detection, Prediction
from edgewire.errors import TaskStateError


class TaskState(str, enum.Enum):
    RAW = "RAW"
    JUDGED = "JUDGED"
    COMPLETE = "COMPLETE"
    PENDING_CLOUD = "PENDING_CLOUD"
    TIMEOUT = "TIMEOUT"


ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    TaskState.RAW: frozenset({TaskState.JUDGED}),
    TaskState.JUDGED: frozenset({TaskState.COMPLETE, TaskState.PENDING_CLOUD}),
    TaskState.PENDING_CLOUD: frozenset({TaskState.COMPLETE, TaskState.TIMEOUT}),
    TaskState.COMPLETE: frozenset(),
    TaskState.TIMEOUT: frozenset(),
}
TERMINAL = frozenset({TaskState.COMPLETE, TaskState.TIMEOUT})

#: Random bytes per trace id: 128 bits, so no one can guess the id of a frame not yet sent
#: (a guessed id sent first would otherwise claim that frame's request at the bridge).
TRACE_ID_BYTES = 16


#: Trace ids read from the system's random source at a time.
_IDS_PER_READ = 256


class _TraceIds:
    """Trace ids read ahead from the system's random source, a few hundred at a time: a device
    numbers every frame, and a system call per batch is a pass of the interpreter lock handed to
    the workers and back. Read again after a fork, so two processes never share ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._next = 0
        os.register_at_fork(after_in_child=self._forget)

    def take(self, count: int) -> list[str]:
        with self._lock:
            start, end = self._next, self._next + count
            if end > len(self._ids):
                self._ids = self._ids[start:] + _read_ids(max(count, _IDS_PER_READ))
                start, end = 0, count
            self._next = end
            return self._ids[start:end]

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._ids, self._next = [], 0


def _read_ids(count: int) -> list[str]:
    raw = os.urandom(TRACE_ID_BYTES * count).hex()
    step = TRACE_ID_BYTES * 2
    return [raw[i : i + step] for i in range(0, len(raw), step)]


_TRACE_IDS = _TraceIds()


def new_trace_ids(count: int) -> list[str]:
    """``count`` unguessable trace ids, lowercase hex (a valid topic level), each used once."""
    return _TRACE_IDS.take(count)


@dataclass
class Task:
    trace_id: str
    seq: int
    source_ref: str
    created: float
    state: TaskState = TaskState.RAW
    prediction: Prediction | None = None
    #: A detector's objects (the frame's answer instead of ``prediction``).
    detections: list[Detection] | None = None
    reasons: tuple[str, ...] = ()
    answered_by: str = "edge"
    #: Model that gave ``prediction`` when it was not the device's own (a cloud answer).
    model: str | None = None
    version: str | None = None
    degraded: bool = False
    finished: float | None = None
    history: list[TaskState] = field(default_factory=list)

    def to(self, state: TaskState) -> None:
        if state not in ALLOWED[self.state]:
            raise TaskStateError(f"task {self.trace_id}: {self.state.value} -> {state.value} is not allowed")
        self.history.append(self.state)
        self.state = state
        if state in TERMINAL:
            self.finished = time.time()

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def latency_ms(self) -> float:
        end = self.finished if self.finished is not None else time.time()
        return (end - self.created) * 1000.0
