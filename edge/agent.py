"""The device agent: source -> decode/preprocess/infer/judge (worker threads) -> task -> publish.

Decoding, preprocessing, inference, judging and a classifier's answers (rows packed for the
wire) run on worker threads, a micro-batch at a time (:mod:`.worker_batch`), so the event loop
stays free to read the source and move messages; batches are still finished strictly in frame
order. Hard frames go to the cloud (:mod:`.escalation`) and wait for their answer or their
deadline; everything else is answered at once.

A missing broker or cloud never stops the device. It switches to degraded mode (:mod:`.mode`,
published on its presence topic and counted): every frame is answered locally at once, flagged
degraded, and hard frames are still queued so that the cloud's answer comes back later as a late
result. It leaves degraded mode when the link returns and the cloud answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from edgewire import __version__, logs, sdnotify, topics
from edgewire import envelopes as env
from edgewire.aio import cancel_and_wait, spawn
from edgewire.config import DeviceConfig
from edgewire.errors import ModelError, SourceError
from edgewire.metrics import Meter
from edgewire.modelmeta import ModelMeta
from edgewire.profiles import DeviceProfile, load_profile
from edgewire.session import MqttSession, NotConnected

from .active_model import ActiveModel, load_model
from .backlog import Backlog
from .connection import advertisement, device_session
from .escalation import Escalations
from .handoff import Workers, run_on
from .inbox import Inbox
from .judge import Judge, Verdicts
from .local_results import LocalRows
from .local_stream import LocalStream
from .mode import DEGRADED, DeviceMode
from .model_updater import ModelUpdater
from .object_frames import ObjectFrames
from .remote_config import RemoteConfig
from .sources import FolderSource, Frame, QueueSource, chunks, open_source
from .state import DeviceState
from .tasks import Task, TaskState
from .telemetry import AgentSummary, observe_answered_here, publish_telemetry, report_every
from .worker_batch import Batch, work_batch
from .write_window import WriteWindow

log = logging.getLogger(__name__)

ResultHook = Callable[[env.LocalResult], None]


class EdgeAgent:
    def __init__(
        self,
        config: DeviceConfig,
        *,
        profile: DeviceProfile | None = None,
        on_result: ResultHook | None = None,
        boot_config: DeviceConfig | None = None,
        state: DeviceState | None = None,
    ) -> None:
        """``boot_config``: the configuration as its file has it, when ``config`` has saved
        over-the-air documents merged in; ``state``: where the device keeps its state documents
        (default: ``state.json`` in the model store, else in memory)."""
        self.config = config
        self.profile = profile or load_profile(config.profile)
        self.meter = Meter(config.device_id)
        if state is None:
            state = DeviceState(config.delivery.store / "state.json" if config.delivery is not None else None)
        self.state = state
        self.model = self.load_model(config.model.path)
        self.updater: ModelUpdater | None = None
        if config.delivery is not None:
            self.updater = ModelUpdater(self, config.delivery)
            installed = self.updater.installed_path(self.model.meta.name)
            if installed is not None and installed != Path(config.model.path):
                self.model.engine.close()
                self.model = self.load_model(installed)
        self.fallback: ActiveModel | None = None
        if config.model.fallback is not None:
            self.fallback = self.load_model(config.model.fallback)
            why = self.model.compatible(self.fallback)
            if why is not None:
                raise ModelError(f"{config.model.fallback}: cannot stand in for {self.model.meta.name}: {why}")
        self.source = open_source(config.source)
        self.on_result = on_result
        self.link_mode = DeviceMode(
            config.device_id, self.meter, cloud=config.cloud is not None, on_change=self._refresh_presence
        )
        self._max_batch = min(config.pipeline.max_batch, self.profile.limits.max_batch)
        # Batches run on their own worker threads (OpenCV and onnxruntime release the GIL);
        # results are still taken and published strictly in frame order.
        self._workers = config.pipeline.workers
        self._executor = Workers(self._workers, f"infer-{config.device_id}")
        self.escalations: Escalations | None = None
        if config.cloud is not None:
            self.escalations = Escalations(config, meter=self.meter, mode=self.link_mode, publish=self._publish_later)
        self._stop: asyncio.Event | None = None
        self._first_frame: float | None = None
        self._last_done: float | None = None
        self.session: MqttSession | None = None
        self._jobs: set[asyncio.Future[Any]] = set()
        did = config.device_id
        self._local_topic = topics.LOCAL.build(device_id=did)
        self.remote_config = RemoteConfig(boot_config or config, state, self.meter)
        # A detector's frames, judged per object and followed across frames.
        self.object_frames = ObjectFrames(
            config, self.meter, self.escalations, lambda task: self._local_result(task, None)
        )
        self.inbox = Inbox(
            config.device_id,
            self.meter,
            source=self.source,
            escalations=self.escalations,
            remote_config=self.remote_config,
            updater=self.updater,
            config=lambda: self.config,
            reconfigure=self._reconfigure,
        )

    # -- the model -----------------------------------------------------------------------

    @property
    def meta(self) -> ModelMeta:
        return self.model.meta

    @property
    def judge(self) -> Judge:
        return self.model.judge

    @property
    def device_id(self) -> str:
        return self.config.device_id

    @property
    def fleet(self) -> str:
        return self.config.fleet

    @property
    def mode(self) -> str:
        """joint, degraded or local-only."""
        return self.link_mode.state

    def load_model(self, path: str | Path) -> ActiveModel:
        """Load a model ready to serve (blocking: call it off the event loop when serving)."""
        return load_model(path, self.profile, self.config.judge, self.config.detect)

    def swap_model(self, new: ActiveModel) -> ActiveModel:
        """Serve ``new`` from the next batch on; returns the model it replaced (not closed: a
        batch already running keeps using it, and the caller may still roll back to it)."""
        old, self.model = self.model, new
        self.meter.inc("model_swaps_total")
        log.info("%s: now serving %s %s", self.config.device_id, new.meta.name, new.meta.version)
        self._refresh_presence()
        return old

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the frames in flight, say goodbye on the presence topic, return."""
        if self._stop is not None:
            self._stop.set()
        if isinstance(self.source, QueueSource):
            self.source.close()

    def _presence(self, online: bool) -> env.Presence:
        return env.Presence(
            client_id=self.config.device_id,
            kind="device",
            online=online,
            ts=time.time(),
            software=__version__,
            profile=self.profile.name,
            fleet=self.config.fleet,
            models={self.meta.name: self.meta.version},
            state=self.mode,
        )

    def _refresh_presence(self) -> None:
        if self.session is not None and self.session.connected:
            self._spawn(self.session.refresh_presence())

    async def run(self) -> AgentSummary:
        cfg = self.config
        logs.bind(device_id=cfg.device_id, model=self.meta.name)  # this task's log lines and its children's
        self._stop = asyncio.Event()
        session = device_session(cfg, self._presence, self.meter)
        self.session = session
        if self.escalations is not None:
            self.escalations.attach(session)
        else:
            log.info("%s: no cloud configured: running local-only, hard cases are answered locally", cfg.device_id)
        started = time.monotonic()
        models = f"{self.meta.name}={self.meta.version}"
        try:
            async with advertisement(cfg, profile=self.profile.name, models=models, mode=self.mode), session:
                elapsed = await self._run_session(session, started)
        finally:
            self._executor.shutdown(wait=True)
            if self.escalations is not None:
                self.escalations.close()
            if self.updater is not None:
                self.updater.close()
            self.model.engine.close()
        busy = (self._last_done - self._first_frame) if self._first_frame and self._last_done else 0.0
        return AgentSummary.of(
            self.meter, model=self.meta.name, version=self.meta.version, mode=self.mode, elapsed_s=elapsed, busy_s=busy
        )

    async def _run_session(self, session: MqttSession, started: float) -> float:
        """Subscribe, run the pipeline to its end, wait out escalations; returns seconds run."""
        cfg = self.config
        esc = self.escalations
        for topic_filter, qos in self.inbox.subscriptions():
            await session.subscribe(topic_filter, qos=qos)
        if esc is not None:
            await esc.recover()
        try:
            await session.wait_connected(cfg.broker.startup_wait_s)
        except NotConnected as exc:
            log.warning("%s: %s; answering locally until the broker is reachable", cfg.device_id, exc)
        sdnotify.notify(f"READY=1\nSTATUS={self.mode}, broker {'up' if session.connected else 'down'}")
        helpers = [
            asyncio.create_task(self.inbox.listen(session), name="listen"),
            asyncio.create_task(self._report_telemetry(session), name="telemetry"),
            asyncio.create_task(sdnotify.watchdog(), name="watchdog"),
        ]
        if esc is not None:
            helpers += [asyncio.create_task(job) for job in esc.background()]
            helpers.append(asyncio.create_task(self.link_mode.watch_link(session, esc.link_back), name="link"))
        if self.updater is not None:
            helpers.append(asyncio.create_task(self.updater.run(session), name="updater"))
        try:
            await self._pipeline(session)
            if esc is not None:
                await esc.finish()
            if self._jobs:
                await asyncio.gather(*self._jobs, return_exceptions=True)
        finally:
            await cancel_and_wait(*helpers)
            elapsed = time.monotonic() - started
            await publish_telemetry(session, self.meter, elapsed)
        return elapsed

    # -- pipeline ------------------------------------------------------------------------

    async def _pipeline(self, session: MqttSession) -> None:
        assert self._stop is not None
        stop = self._stop
        frames = Backlog(self.config.pipeline.queue_size)
        # Batches handed to the workers and not yet finished, oldest first: per worker the one it
        # runs, the one it takes next and two more, plus two. The loop is woken for all of them but
        # one per worker (see handoff): each worker still has a batch to run while the loop
        # finishes the others and hands out more. Every wake-up of the loop costs it a cold start
        # on a core the workers were using, so it is woken once per several batches.
        running: deque[asyncio.Future[Batch]] = deque()
        depth = 4 * self._workers + 2
        together = depth - self._workers
        limit = self.config.source.max_frames

        # A folder read at full speed has every frame there at once: batches are taken from it
        # as the workers have room, with no reader task to wake and no backlog to pass through.
        # It is always a full backlog behind (what the fallback model and queue_depth go by).
        instant = self.source if isinstance(self.source, FolderSource) and self.source.instant else None
        taken = 0

        def take_instant(source: FolderSource) -> list[Frame]:
            nonlocal taken
            most = self._max_batch if limit is None else min(self._max_batch, limit - taken)
            group = source.take(most) if most > 0 and not stop.is_set() else []
            if not group:
                frames.close()  # the folder is done: the loop ends once the batches in flight are
                return group
            if self._first_frame is None:
                self._first_frame = time.monotonic()
            taken += len(group)
            return group

        def feed() -> None:
            # Called whenever frames arrive or a batch is finished, so the workers are kept busy
            # without a task of their own to wake for every batch.
            handed = False
            while len(running) < depth:
                if instant is None:
                    group = frames.take_now(self._max_batch)
                    waiting = len(frames)
                elif frames.closed:
                    break
                else:
                    group = take_instant(instant)
                    waiting = frames.limit
                if not group:
                    break
                model = self._pick_model(waiting)
                running.append(run_on(self._executor, self._infer, group, model, together=together))
                handed = True
            if handed and instant is None:
                self.meter.set("queue_depth", len(frames))

        async def read_source() -> None:
            try:
                # Chunks of half the backlog: the reader wakes once per two batches, not each.
                most = min(frames.limit, max(self._max_batch, frames.limit // 2))
                async for chunk in chunks(self.source, most):
                    if stop.is_set():
                        break
                    if self._first_frame is None:
                        self._first_frame = time.monotonic()
                    if limit is not None and chunk[-1].seq + 1 >= limit:
                        await frames.put([frame for frame in chunk if frame.seq < limit])
                        feed()
                        break
                    await frames.put(chunk)
                    feed()
            except SourceError as exc:
                log.error("%s: source failed: %s", self.config.device_id, exc)
            finally:
                frames.close()

        async def finish() -> None:
            # Results go out without waiting for each write; all are written before returning.
            stream = LocalStream(
                WriteWindow(session, self.meter, self._workers + 2),
                self._local_topic,
                topics.LOCAL.qos,
                self.config.device_id,
                self.config.publish.local_min_interval_ms / 1000.0,
            )
            while True:
                feed()
                if running:
                    await running[0]
                    done = [running.popleft().result()]
                    while running and running[0].done():
                        done.append(running.popleft().result())
                    await self._finish(session, done, stream)
                elif frames.drained:
                    break
                else:
                    await frames.arrival()
            await stream.drain()

        if instant is None:
            reader: asyncio.Task[None] | None = asyncio.create_task(read_source(), name="source")
        else:
            reader = None
            self.meter.set("queue_depth", frames.limit)
        try:
            await finish()
        finally:
            for unfinished in running:
                unfinished.cancel()
            if reader is not None:
                await cancel_and_wait(reader)

    def _pick_model(self, waiting: int) -> ActiveModel:
        """The lighter fallback serves while degraded and the frame queue is half full or more."""
        if self.fallback is not None and self.mode == DEGRADED and waiting * 2 >= self.config.pipeline.queue_size:
            self.meter.inc("fallback_batches_total")
            return self.fallback
        return self.model

    def _infer(self, group: list[Frame], model: ActiveModel) -> Batch:
        """Runs on a worker thread, under the settings of the moment (they may change over the air)."""
        return work_batch(group, model, self.config, self.object_frames, keep_rows=self.on_result is not None)

    async def _finish(self, session: MqttSession, batches: list[Batch], stream: LocalStream | None = None) -> None:
        """Finish batches in frame order: those the workers had done when the loop woke, their
        counters added up once for all of them."""
        m = self.meter
        total = completed = hard = 0
        for batch in batches:
            total += len(batch.frames)
            for i, reason in batch.failures.items():
                m.inc("frames_failed_total", reason=reason)
                log.warning("%s: frame %s skipped: %s failed", self.config.device_id, batch.frames[i].ref, reason)
            if self.updater is not None:
                self.updater.observe(batch.model.meta.version, len(batch.ok), len(batch.failures), batch.infer_s)
            if batch.objects is not None:
                results = self.object_frames.finish(batch.frames, batch.ok, batch.objects, batch.model.meta)
                if results:
                    self._last_done = time.monotonic()
                    await self._publish_local(session, results, stream)
                continue
            verdicts, rows = batch.verdicts, batch.answers
            if verdicts is None or rows is None or not len(verdicts):
                continue
            # Every frame is answered here at once unless it is hard and has the cloud to go to.
            answered = len(verdicts)
            if verdicts.hard:
                hard += len(verdicts.hard)
                if self.escalations is not None:
                    answered -= self._escalate_hard(batch, verdicts, rows, self.escalations)
            completed += answered
            self._last_done = time.monotonic()
            observe_answered_here(m, rows)
            await self._publish_local(session, rows, stream)
        m.inc("frames_total", total)
        if hard:
            m.inc("frames_hard_total", hard)
        if completed:
            m.inc("frames_completed_total", completed)

    def _escalate_hard(self, batch: Batch, verdicts: Verdicts, results: LocalRows, esc: Escalations) -> int:
        """Send a batch's hard frames to the cloud, their rows changed to say so; returns how
        many wait for the cloud's answer (the others are answered here, flagged degraded)."""
        frames, meta, trace_ids = batch.frames, batch.model.meta, batch.trace_ids
        waiting = 0
        for j in verdicts.hard:
            i = batch.ok[j]
            payload = batch.payloads.get(i)
            if payload is None:
                continue  # nothing to send: answered here, flagged degraded
            frame = frames[i]
            task = Task(trace_id=trace_ids[j], seq=frame.seq, source_ref=frame.ref, created=frame.ts)
            task.prediction = verdicts.prediction(j)
            task.reasons = verdicts.reasons[j]
            task.model, task.version = meta.name, meta.version
            task.to(TaskState.JUDGED)
            waits = esc.may_wait()
            if waits:
                task.to(TaskState.PENDING_CLOUD)
                waiting += 1
            else:
                # No link or no room: a hard case is answered here, flagged.
                task.degraded = True
                task.to(TaskState.COMPLETE)
            result = self._local_result(task, verdicts.sharpness[j])
            results.put(j, result)
            if waits or esc.queues_offline:
                esc.escalate(task, result, payload, frame.content_type)
        return waiting

    def _local_result(self, task: Task, sharp: float | None) -> env.LocalResult:
        assert task.prediction is not None or task.detections is not None
        return env.LocalResult(
            trace_id=task.trace_id,
            device_id=self.config.device_id,
            seq=task.seq,
            source_ref=task.source_ref,
            ts=task.created,
            state=task.state.value,
            answered_by=task.answered_by,
            prediction=task.prediction,
            detections=task.detections,
            reasons=list(task.reasons),
            sharpness=sharp,
            model=task.model or self.meta.name,
            version=task.version or self.meta.version,
            degraded=task.degraded,
            latency_ms=task.latency_ms,
        )

    async def _publish_local(
        self, session: MqttSession, results: list[env.LocalResult] | LocalRows, stream: LocalStream | None = None
    ) -> None:
        rows = results if isinstance(results, LocalRows) else LocalRows.of(results)
        if self.on_result is not None:
            for result in rows.envelopes():
                self.on_result(result)
        if self.config.publish.local_results and rows:
            if stream is not None:
                await stream.add(rows)
            else:
                await session.publish(self._local_topic, rows.encode(self.config.device_id), qos=topics.LOCAL.qos)

    async def _publish_later(self, results: list[env.LocalResult]) -> None:
        """Final outcomes of escalated frames, published as they come."""
        assert self.session is not None
        self._last_done = time.monotonic()
        self.object_frames.answered(results)
        await self._publish_local(self.session, results)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(self._jobs, coro)

    # -- control plane -------------------------------------------------------------------

    async def _report_telemetry(self, session: MqttSession) -> None:
        await report_every(session, self.meter, lambda: self.config.publish.telemetry_interval_s)

    def _reconfigure(self, config: DeviceConfig) -> None:
        """Take settings that apply at once (judge, escalation, publishing)."""
        self.config = config
        self.model = self.model.judged_by(config.judge, config.detect)
        if self.escalations is not None and config.cloud is not None:
            self.escalations.cloud = config.cloud
