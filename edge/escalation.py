"""Hard frames on their way to the cloud: one request per trace_id, one answer, or a timeout.

Each escalated task waits in a table keyed by trace_id with a timer at its deadline. The first
of (answer, deadline) completes it; anything that arrives later -- a duplicate answer, a late
one, an answer for a trace this device never sent -- finds no task and is only counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgewire import envelopes as env
from edgewire.config import CloudSettings
from edgewire.metrics import Meter

from .tasks import Task, TaskState

log = logging.getLogger(__name__)

Complete = Callable[[Task], Awaitable[None]]


def takes_cloud(settings: CloudSettings, local: env.Prediction, cloud: env.Prediction) -> bool:
    """The merge policy: whether the cloud's answer replaces the local one."""
    return settings.merge == "prefer_cloud" or cloud.confidence >= local.confidence


@dataclass
class Pending:
    task: Task
    local: env.Prediction
    timer: asyncio.TimerHandle


class Escalator:
    def __init__(self, settings: CloudSettings, meter: Meter, on_complete: Complete) -> None:
        self.settings = settings
        self.meter = meter
        self._on_complete = on_complete
        self._pending: dict[str, Pending] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def is_pending(self, trace_id: str) -> bool:
        return trace_id in self._pending

    def has_room(self) -> bool:
        return len(self._pending) < self.settings.max_pending

    def deadline_for(self, task: Task) -> float:
        return task.created + self.settings.deadline_ms / 1000.0

    def track(self, task: Task) -> None:
        """Start waiting for ``task``'s answer; it must already be PENDING_CLOUD."""
        assert task.prediction is not None
        loop = asyncio.get_running_loop()
        delay = max(0.0, self.deadline_for(task) - time.time())
        timer = loop.call_later(delay, self._expire, task.trace_id)
        self._pending[task.trace_id] = Pending(task, task.prediction, timer)
        self._idle.clear()
        self.meter.set("escalations_pending", len(self._pending))

    def cancel(self, trace_id: str) -> Task | None:
        """Forget a task whose request could not be sent; the caller answers it locally."""
        entry = self._pending.pop(trace_id, None)
        if entry is None:
            return None
        entry.timer.cancel()
        self._settle()
        return entry.task

    async def resolve(self, result: env.Result) -> None:
        entry = self._pending.pop(result.trace_id, None)
        if entry is None:
            self.meter.inc("results_ignored_total", reason="unknown_or_late")
            return
        entry.timer.cancel()
        task = entry.task
        if result.status == "ok" and result.prediction is not None:
            cloud = result.prediction
            if takes_cloud(self.settings, entry.local, cloud):
                task.prediction = cloud
                task.answered_by = "cloud"
                task.model = result.model
                task.version = result.version
            task.degraded = False
            self.meter.inc("results_total", status="ok")
        else:
            # unavailable / rejected / expired: keep the local answer, flagged.
            task.degraded = True
            self.meter.inc("results_total", status=result.status)
            log.info("trace %s answered %s: %s", task.trace_id, result.status, result.reason)
        task.to(TaskState.COMPLETE)
        self._settle()
        await self._on_complete(task)

    def _expire(self, trace_id: str) -> None:
        entry = self._pending.pop(trace_id, None)
        if entry is None:
            return
        entry.task.degraded = True
        entry.task.to(TaskState.TIMEOUT)
        self.meter.inc("escalations_timed_out_total")
        self._settle()
        job = asyncio.ensure_future(self._on_complete(entry.task))
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    def _settle(self) -> None:
        self.meter.set("escalations_pending", len(self._pending))
        if not self._pending:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until every escalation is answered or timed out (each has a deadline)."""
        await self._idle.wait()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
