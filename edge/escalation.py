"""A hard frame's trip to the cloud and back, from its request to its one final outcome.

A hard frame the device may wait for (joint mode, link up, room) is recorded PENDING_CLOUD and
waits here for its answer or its deadline; one answered at once (degraded) may still be queued,
so the cloud's answer comes back later as a late result. Either way its request and the
escalation owed an answer are made durable in one outbox transaction (group commit), and the
forwarder sends it.

Every escalation ends through one of two doors, both here and both serialised:

* :meth:`Escalations._answered` -- an answer arrived; it counts only if it flips the owed row
  from waiting (a duplicate, even across restarts, finds nothing to flip);
* :meth:`Escalations._time_out` -- the deadline passed: the frame's own timer, the forwarder
  dropping a request at its deadline, or the overdue sweep after a restart all come here.

The final outcome is made by one rule, :func:`~.merge.final_outcome`, from the frame's first result
(kept in the outbox as the escalation's note, so it survives a restart) and the answer, if any.
Cloud outcomes also move the device's mode: timeouts and unavailable answers count against the
cloud, an ok answer restores joint mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from edgewire import envelopes as env
from edgewire import topics
from edgewire.aio import spawn
from edgewire.config import DeviceConfig
from edgewire.errors import DecodeError
from edgewire.hops import ANSWER_HOPS
from edgewire.metrics import Meter
from edgewire.session import MqttSession

from .forwarder import Forwarder
from .merge import final_outcome
from .mode import JOINT, DeviceMode
from .outbox import Outbox, OutboxEntry, OutboxFull, OwedState, QueuedEntry
from .tasks import Task, TaskState

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Hands finished outcomes to the device's local-results path.
Publish = Callable[[list[env.LocalResult]], Awaitable[None]]
#: Settled answers are kept this long to recognise a duplicate of them.
SETTLED_KEEP_S = 3600.0
#: How often owed answers past their deadline and on no timer here are looked for.
SWEEP_EVERY_S = 1.0


def _rate_limited(answer: env.Result) -> bool:
    """The bridge refused the request because this device is past its budget (topics.md)."""
    return answer.status == "rejected" and answer.reason == env.RATE_LIMITED


@dataclass
class _Waiting:
    """A frame of this run waiting for its answer; its timer is armed once its request is durable."""

    task: Task
    first: env.LocalResult
    timer: asyncio.TimerHandle | None = None
    #: The device's hop stamps so far (edgewire.hops), when it stamps them.
    hops: dict[str, float] | None = None


@dataclass(frozen=True)
class _Ending:
    """How an escalation ends, decided before its owed row is flipped: ``first`` is None when
    nothing is known of it (neither waiting here nor owed)."""

    trace_id: str
    first: env.LocalResult | None
    final: env.LocalResult | None
    late: bool


@dataclass
class _Escalation:
    task: Task
    first: env.LocalResult
    entry: OutboxEntry


class Escalations:
    def __init__(self, config: DeviceConfig, *, meter: Meter, mode: DeviceMode, publish: Publish) -> None:
        assert config.cloud is not None
        self.cloud = config.cloud
        self.device_id = config.device_id
        self.fleet = config.fleet
        self.stamp_hops = config.publish.hop_stamps
        self._retry_after_s = config.cloud.outbox.resend_after_s
        self.meter = meter
        self.mode = mode
        self._publish = publish
        box = config.cloud.outbox
        if box.path is not None:
            box.path.parent.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            box.path if box.path is not None else ":memory:",
            max_count=box.max_messages,
            max_bytes=box.max_bytes,
            max_age_s=box.max_age_s,
            policy=box.when_full,
            durable=box.path is not None,
            meter=meter,
        )
        # The outbox's one thread: SQLite is used from it alone, and the event loop never waits on fsync.
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"outbox-{config.device_id}")
        self.result_topic = topics.RESULT.build(device_id=config.device_id)
        self.session: MqttSession | None = None
        self.forwarder: Forwarder | None = None
        self._waiting: dict[str, _Waiting] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._answers: asyncio.Queue[tuple[env.Result, float]] = asyncio.Queue()
        self._unrecorded: list[_Escalation] = []
        # Answers and timeouts end escalations one decision at a time: an owed row flipped and
        # its waiting frame taken are one step, so no frame ends twice.
        self._deciding = asyncio.Lock()
        self._jobs: set[asyncio.Future[Any]] = set()

    # -- wiring ------------------------------------------------------------------------------

    def attach(self, session: MqttSession) -> None:
        self.session = session
        self.forwarder = Forwarder(
            self.outbox,
            session,
            self.cloud.outbox,
            self.meter,
            on_expired=self._requests_expired,
            io=self._io,
            on_sent=self._requests_sent if self.stamp_hops else None,
        )

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self.result_topic, topics.RESULT.qos)]

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """What runs beside the pipeline: the forwarder, the answers, the overdue sweep."""
        assert self.forwarder is not None
        return [self.forwarder.run(), self._receive_answers(), self._sweep_overdue_often()]

    async def link_back(self) -> None:
        assert self.forwarder is not None
        await self.forwarder.link_back()

    async def recover(self) -> None:
        """After a restart: publish the outcomes a crash decided but cut short of going out,
        finish what it left owed (answers whose deadline passed while the device was down are
        recorded TIMEOUT), and forget answers old enough."""
        stored = await self._db(self.outbox.unpublished_outcomes)
        if stored:
            log.info("%s: publishing %d outcomes decided before a restart", self.device_id, len(stored))
            finals = []
            for key, doc in stored:
                try:
                    finals.extend(env.decode(env.LocalResults, doc).results)
                except DecodeError as exc:
                    log.error("%s: the stored outcome of %s is unreadable, dropped: %s", self.device_id, key, exc)
                    await self._db(self.outbox.outcomes_published, [key])
            await self._finished(finals, stored=True)
        await self._db(self.outbox.forget_settled, SETTLED_KEEP_S)
        pending = await self._db(self.outbox.waiting)
        queued = len(self.outbox)
        if pending or queued:
            log.info("%s: resuming with %d queued requests, %d answers owed", self.device_id, queued, pending)
        self.meter.set("outbox_depth", queued)
        await self._sweep_overdue()

    async def finish(self) -> None:
        """Wait until every escalation of this run has its outcome (each has a deadline), then
        hand what is queued to the broker; what is left stays durable for the next start."""
        while self._jobs or not self._idle.is_set():
            await asyncio.gather(*self._jobs, return_exceptions=True)
            await self._idle.wait()
        if self.forwarder is not None and self.session is not None and self.session.connected:
            await self.forwarder.wait_empty(2.0)

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self.outbox.close()

    # -- out: requests -----------------------------------------------------------------------

    @property
    def queues_offline(self) -> bool:
        """Whether a hard frame answered at once still has its request queued for a late answer."""
        return self.cloud.offline_deadline_s > 0

    def may_wait(self) -> bool:
        """Whether a hard frame may wait for the cloud's answer (else it is answered now)."""
        if self.mode.state != JOINT or self.session is None or not self.session.connected:
            self.meter.inc("escalations_skipped_total", reason="degraded")
            return False
        if len(self._waiting) >= self.cloud.max_pending:
            self.meter.inc("escalations_skipped_total", reason="backlog")
            return False
        return True

    def escalate(
        self,
        task: Task,
        first: env.LocalResult,
        payload: bytes,
        content_type: str,
        *,
        crops: list[env.Crop] | None = None,
    ) -> None:
        """Send ``task``'s frame (or, for a detector, the ``crops`` of its uncertain objects with
        an empty ``payload``) to the cloud. A PENDING_CLOUD task waits for its answer from now
        on; the requests escalated in one turn of the event loop share one durable commit."""
        waits = task.state is TaskState.PENDING_CLOUD
        if waits:
            hops = {"captured": task.created, "judged": time.time()} if self.stamp_hops else None
            self._waiting[task.trace_id] = _Waiting(task, first, hops=hops)
            self._idle.clear()
            self.meter.set("escalations_pending", len(self._waiting))
        deadline = (
            task.created + self.cloud.deadline_ms / 1000.0 if waits else time.time() + self.cloud.offline_deadline_s
        )
        entry = self._request(task, first, payload, content_type, deadline, crops or [])
        if not self._unrecorded:
            self._spawn(self._record())
        self._unrecorded.append(_Escalation(task, first, entry))

    def _request(
        self,
        task: Task,
        first: env.LocalResult,
        payload: bytes,
        content_type: str,
        deadline: float,
        crops: list[env.Crop],
    ) -> OutboxEntry:
        assert task.prediction is not None or task.detections is not None
        detecting = task.detections is not None
        request = env.Request(
            task="detect" if detecting else "classify",
            detections=task.detections or [],
            crops=crops,
            trace_id=task.trace_id,
            device_id=self.device_id,
            fleet=self.fleet,
            created=task.created,
            deadline=deadline,
            model_hint=self.cloud.model_hint,
            local=task.prediction,
            reasons=list(task.reasons),
            payload=payload,
            content_type=content_type,
            reply_to=self.result_topic,
        )
        return OutboxEntry(
            topic=topics.REQUEST.build(device_id=self.device_id, trace_id=task.trace_id),
            payload=env.encode(request),
            qos=topics.REQUEST.qos,
            deadline=deadline,
            key=task.trace_id,
            # What finishes the frame when its answer arrives, even after a restart.
            note=env.encode(env.LocalResults(device_id=self.device_id, results=[first])),
        )

    async def _record(self) -> None:
        """Make the requests durable (one group commit), arm the deadlines of those waiting, then
        let the forwarder send them. A request the full outbox refused is answered locally."""
        batch, self._unrecorded = self._unrecorded, []
        accepted = batch
        refused: list[_Escalation] = []
        try:
            await self._db(self.outbox.put_many, [e.entry for e in batch])
        except OutboxFull as exc:
            accepted, refused = batch[: len(exc.accepted)], batch[len(exc.accepted) :]
            log.warning("%s: %s", self.device_id, exc)
            self.meter.inc("escalations_skipped_total", len(refused), reason="outbox_full")
        except Exception:
            log.exception("%s: %d escalations could not be recorded", self.device_id, len(batch))
            accepted, refused = [], batch
        loop = asyncio.get_running_loop()
        recorded = time.time()
        for e in accepted:
            waiting = self._waiting.get(e.task.trace_id)
            if waiting is not None:
                if waiting.hops is not None:
                    waiting.hops["queued"] = recorded
                delay = max(0.0, (e.entry.deadline or 0.0) - time.time())
                waiting.timer = loop.call_later(delay, self._deadline_passed, e.task.trace_id)
        finals = []
        for e in refused:
            waiting = self._waiting.pop(e.task.trace_id, None)
            if waiting is not None:
                waiting.task.degraded = True
                waiting.task.to(TaskState.COMPLETE)
                latency = (time.time() - e.first.ts) * 1000.0
                update = {"state": TaskState.COMPLETE.value, "degraded": True, "latency_ms": latency}
                finals.append(e.first.model_copy(update=update))
                self.meter.inc("frames_completed_total")
        self._waiting_changed()
        if accepted:
            self.meter.inc("frames_escalated_total", len(accepted))
            self.meter.inc("bytes_escalated_total", sum(len(e.entry.payload) for e in accepted))
            if self.forwarder is not None:
                self.forwarder.wake()
        await self._finished(finals)

    # -- in: answers -------------------------------------------------------------------------

    def receive(self, result: env.Result, topic: str) -> None:
        if result.device_id != self.device_id:
            raise DecodeError(f"Result for device {result.device_id!r} arrived on {topic}")
        self._answers.put_nowait((result, time.time()))

    async def _receive_answers(self) -> None:
        """Take answers a burst at a time: one transaction settles them all."""
        while True:
            burst = [await self._answers.get()]
            while not self._answers.empty():
                burst.append(self._answers.get_nowait())
            try:
                await self._answered(burst)
            except Exception:  # a bug or a failing disk must not end the taking of answers for good
                log.exception("%s: %d answers could not be taken", self.device_id, len(burst))

    def _requests_sent(self, entries: list[QueuedEntry], at: float) -> None:
        """The forwarder handed these requests to the broker at ``at``: their ``sent`` stamp
        (the first send; a resend's wait is part of the trip)."""
        for entry in entries:
            key = topics.REQUEST.match(entry.topic)
            waiting = self._waiting.get(key["trace_id"]) if key is not None else None
            if waiting is not None and waiting.hops is not None:
                waiting.hops.setdefault("sent", at)

    async def _answered(self, burst: list[tuple[env.Result, float]]) -> None:
        """Only an answer that flipped its owed row is used; a duplicate, even across restarts, is dropped."""
        finals: list[env.LocalResult] = []
        async with self._deciding:
            burst = await self._retry_unserved(burst)
            plans = await self._plan([(r.trace_id, r, received) for r, received in burst])
            owed: list[tuple[str, OwedState]] = [(r.trace_id, "answered") for r, _ in burst]
            decided = self._stored(plans)
            fresh = await self._db(lambda: self.outbox.settle_many(owed, decided=decided))
            for (result, _), plan, new in zip(burst, plans, fresh, strict=True):
                if not new:
                    self.meter.inc("results_ignored_total", reason="duplicate_or_late")
                    continue
                if result.status == "ok":
                    self.mode.cloud_answered(self.session is not None and self.session.connected)
                elif result.status == "unavailable":
                    self.mode.cloud_failed("unavailable", self.cloud.degraded_after)
                final = self._ended(plan, result)
                if final is not None:
                    finals.append(final)
        await self._finished(finals, stored=True)

    async def _retry_unserved(self, burst: list[tuple[env.Result, float]]) -> list[tuple[env.Result, float]]:
        """The answers that end their escalation. Two answers say "not now" rather than "no":
        ``unavailable`` (no model could serve: Triton down, circuits open) and ``rejected`` with
        reason ``rate limited`` (this device sent past its budget at the bridge). Either, to a
        request nobody waits for here -- queued while degraded, or left by a restart -- whose
        deadline is still well ahead, does not end it: the request stays owed and goes again on
        the forwarder's resend schedule (doubling per attempt), so an outage of the cloud's
        models or a burst past the budget costs a queued request a delay, not its answer. A
        frame waiting here ends at once. Only ``unavailable`` counts against the cloud: a rate
        limit says this device asked too much, not that the cloud is failing."""
        maybe = [
            (r.trace_id, "unavailable" if r.status == "unavailable" else "rate_limited")
            for r, _ in burst
            if (r.status == "unavailable" or _rate_limited(r)) and r.trace_id not in self._waiting
        ]
        if not maybe:
            return burst
        ahead_s = self._retry_after_s
        keys = [key for key, _ in maybe]
        kept = await self._db(lambda: self.outbox.retry_later(keys, ahead_s=ahead_s))
        later = {key: why for (key, why), k in zip(maybe, kept, strict=True) if k}
        if not later:
            return burst
        for why in ("unavailable", "rate_limited"):
            n = sum(1 for w in later.values() if w == why)
            if n:
                self.meter.inc("results_retried_total", n, status=why)
        if "unavailable" in later.values():
            self.mode.cloud_failed("unavailable", self.cloud.degraded_after)
        return [(r, t) for r, t in burst if r.trace_id not in later]

    async def _plan(self, ends: list[tuple[str, env.Result | None, float | None]]) -> list[_Ending]:
        """How each escalation would end, decided before its owed row is flipped so that the
        flip stores the outcome with it: a frame waiting here ends on time; any other (queued
        while degraded, or left unfinished by a restart) ends late, from the note its request
        was recorded with. ``ends``: (trace id, answer or None for its deadline, when received)."""
        elsewhere = [key for key, _, _ in ends if key not in self._waiting]
        notes: dict[str, bytes] = {}
        if elsewhere:
            try:
                notes = await self._db(self.outbox.notes_of, elsewhere)
            except Exception:  # the frames waiting here still end
                log.exception("%s: the notes of %d escalations could not be read", self.device_id, len(elsewhere))
        plans = []
        for key, answer, received in ends:
            waiting = self._waiting.get(key)
            if waiting is not None:
                first, late, hops = waiting.first, False, waiting.hops
            elif key in notes:
                first, late, hops = env.decode(env.LocalResults, notes[key]).results[0], True, None
            else:
                plans.append(_Ending(key, None, None, late=True))
                continue
            if hops is not None and answer is not None:
                hops = {**hops, **{k: answer.hops[k] for k in ANSWER_HOPS if k in answer.hops}}
                if received is not None:
                    hops["answer_received"] = received
            final = final_outcome(self.cloud, first, answer, late=late, hops=hops)
            plans.append(_Ending(key, first, final, late=late))
        return plans

    def _stored(self, plans: list[_Ending]) -> dict[str, bytes]:
        """The final outcomes to store with their flips, as they will be published."""
        return {
            p.trace_id: env.encode(env.LocalResults(device_id=self.device_id, results=[p.final]))
            for p in plans
            if p.final is not None
        }

    def _ended(self, plan: _Ending, answer: env.Result | None) -> env.LocalResult | None:
        """An escalation whose owed row this run just settled (or whose frame waits here with
        no row left to settle) ends as planned: the frame stops waiting, and it is counted."""
        if plan.first is None:
            self.meter.inc("results_ignored_total", reason="unknown")
            return None
        waiting = self._waiting.pop(plan.trace_id, None)
        if waiting is not None:
            if waiting.timer is not None:
                waiting.timer.cancel()
            self._waiting_changed()
        final = plan.final
        if plan.first.state == TaskState.PENDING_CLOUD.value:
            self.meter.inc("frames_completed_total")
        if answer is not None:
            if plan.late:
                self.meter.inc("late_results_total", status=answer.status)
            else:
                self.meter.inc("results_total", status=answer.status)
                if answer.status != "ok":
                    log.info(
                        "trace %s answered %s: %s",
                        plan.trace_id,
                        answer.status,
                        answer.reason,
                        extra={"trace_id": plan.trace_id},
                    )
        if waiting is not None:
            waiting.task.degraded = final is not None and final.degraded
            waiting.task.to(TaskState.TIMEOUT if answer is None else TaskState.COMPLETE)
        if final is None:
            return None
        if not plan.late:
            self.meter.observe("frame_latency_ms", final.latency_ms, path="escalated")
        if final.state == TaskState.TIMEOUT.value:
            self.meter.inc("escalations_timed_out_total")
            if not plan.late:
                self.mode.cloud_failed("timeout", self.cloud.degraded_after)
        return final

    # -- deadlines ---------------------------------------------------------------------------

    def _deadline_passed(self, trace_id: str) -> None:
        self._spawn(self._time_out([trace_id]))

    async def _requests_expired(self, entries: list[QueuedEntry]) -> None:
        """Requests the forwarder dropped at their deadline."""
        keys = [topics.REQUEST.match(e.topic) for e in entries]
        await self._time_out([k["trace_id"] for k in keys if k is not None])

    async def _sweep_overdue(self) -> None:
        """Answers owed past their deadline (a previous run's, or the device was down when it
        passed) are timed out, so every escalated frame ends with exactly one outcome."""
        overdue = await self._db(self.outbox.overdue)
        if overdue:
            await self._time_out(overdue)

    async def _sweep_overdue_often(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            await self._sweep_overdue()

    async def _time_out(self, trace_ids: list[str]) -> None:
        """The one timeout decision: an escalation still owed an answer past its deadline ends
        TIMEOUT if its frame was waiting (here, or in a run a restart cut short); one answered
        locally already just stops waiting. A request given up on is still forwarded for audit
        if so configured."""
        finals: list[env.LocalResult] = []
        async with self._deciding:
            plans = await self._plan([(key, None, None) for key in trace_ids])
            try:
                expired = await self._settle_expired(trace_ids, self._stored(plans))
            except Exception:  # the frames waiting here still end at their deadline
                log.exception("%s: %d overdue escalations could not be settled", self.device_id, len(trace_ids))
                expired = [False] * len(trace_ids)
            for plan, mine in zip(plans, expired, strict=True):
                # Not mine but still waiting here: the bounded outbox dropped its request (and
                # settled its row), so no answer can come; its deadline ends it all the same.
                if mine or plan.trace_id in self._waiting:
                    final = self._ended(plan, None)
                    if final is not None:
                        finals.append(final)
        await self._finished(finals, stored=True)

    # -- helpers -----------------------------------------------------------------------------

    async def _finished(self, finals: list[env.LocalResult], *, stored: bool = False) -> None:
        """Publish final outcomes; the run may end once none is waiting and these are out.
        ``stored``: their flips stored them, which are forgotten once they are out."""
        try:
            if finals:
                await self._publish(finals)
                if stored:
                    await self._db(self.outbox.outcomes_published, [f.trace_id for f in finals])
        finally:
            if not self._waiting:
                self._idle.set()

    async def _settle_expired(self, trace_ids: list[str], decided: dict[str, bytes]) -> list[bool]:
        """Flip owed rows to expired (one transaction); True where this call did it. A request
        given up on stays queued, if it never left, when late requests are forwarded for audit."""
        keep = self.cloud.outbox.late == "forward"
        outcomes: list[tuple[str, OwedState]] = [(k, "expired") for k in trace_ids]
        return await self._db(lambda: self.outbox.settle_many(outcomes, keep_unsent=keep, decided=decided))

    def _waiting_changed(self) -> None:
        self.meter.set("escalations_pending", len(self._waiting))

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Outbox calls run on the one I/O thread."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(self._jobs, coro)
