"""The device agent: source -> decode/preprocess/infer/judge (worker threads) -> task -> publish.

Decoding, preprocessing, inference and judging run on worker threads, a micro-batch at a time,
so the event loop stays free to read the source and move messages; batches are still finished
strictly in frame order. Hard frames go to the cloud as one request each through the durable
outbox and wait for their answer or their deadline; everything else is answered at once.

A missing broker or cloud never stops the device. It switches to degraded mode (published on its
presence topic and counted): every frame is answered locally at once, flagged degraded, and hard
frames are still queued so that the cloud's answer comes back later as a late result. It leaves
degraded mode when the link returns and the cloud answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgewire import __version__, sdnotify, topics
from edgewire import envelopes as env
from edgewire.aio import cancel_and_wait
from edgewire.config import DeviceConfig
from edgewire.errors import DecodeError, ModelError, SourceError, TopicError
from edgewire.metrics import Meter
from edgewire.modelmeta import ModelMeta
from edgewire.preprocess import Preprocessor, decode, read, sharpness
from edgewire.profiles import DeviceProfile, load_profile
from edgewire.session import MqttSession, NotConnected

from . import remote_config
from .backlog import Backlog
from .engines import Engine, create_engine
from .escalation import Escalator, takes_cloud
from .forwarder import Forwarder
from .handoff import run_on
from .judge import Judge, Verdicts
from .local_results import LocalRows, answered_here
from .outbox import Item, Message, Outbox, OutboxFull
from .sources import Frame, QueueSource, chunks, open_source
from .tasks import Task, TaskState
from .write_window import WriteWindow

log = logging.getLogger(__name__)

ResultHook = Callable[[env.LocalResult], None]

JOINT, DEGRADED, LOCAL_ONLY = "joint", "degraded", "local-only"
#: Settled answers are kept this long to recognise a duplicate of them.
_SETTLED_KEEP_S = 3600.0


@dataclass
class AgentSummary:
    device_id: str
    model: str
    version: str
    mode: str
    frames: int
    completed: int
    hard: int
    escalated: int
    timeouts: int
    failed: int
    rejected: int
    elapsed_s: float
    # From the first frame read to the last result out: the pipeline's own time, without
    # connecting and saying goodbye.
    busy_s: float
    late: int = 0

    @property
    def fps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class ActiveModel:
    """What a batch runs with. Swapped as one reference, so no batch sees half of two models."""

    engine: Engine
    meta: ModelMeta
    pre: Preprocessor
    judge: Judge

    def compatible(self, other: ActiveModel) -> str | None:
        """Why ``other`` cannot stand in for this model, or None."""
        if other.meta.labels != self.meta.labels:
            return f"labels differ ({len(other.meta.labels)} vs {len(self.meta.labels)})"
        return None


@dataclass
class _Batch:
    frames: list[Frame]
    model: ActiveModel
    #: Indices in ``frames`` of the frames decoded, in order; ``verdicts`` are theirs.
    ok: list[int] = field(default_factory=list)
    verdicts: Verdicts | None = None
    failures: dict[int, str] = field(default_factory=dict)
    #: Encoded bytes of the hard frames, by index in ``frames``, read on the worker thread.
    payloads: dict[int, bytes] = field(default_factory=dict)
    infer_s: float = 0.0


class EdgeAgent:
    def __init__(
        self,
        config: DeviceConfig,
        *,
        profile: DeviceProfile | None = None,
        on_result: ResultHook | None = None,
        boot_config: DeviceConfig | None = None,
        saved_desired: remote_config.SavedDesired | None = None,
    ) -> None:
        """``boot_config``: the configuration as its file has it, when ``config`` has saved
        over-the-air documents merged in; ``saved_desired``: where accepted documents are kept."""
        self.config = config
        self.profile = profile or load_profile(config.profile)
        self.meter = Meter(config.device_id)
        self.model = self.load_model(config.model.path)
        self.updater: Any = None
        if config.delivery is not None:
            from .model_updater import ModelUpdater

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
        self.mode = JOINT if config.cloud is not None else LOCAL_ONLY
        self._max_batch = min(config.pipeline.max_batch, self.profile.limits.max_batch)
        # Batches run on their own worker threads (OpenCV and onnxruntime release the GIL);
        # results are still taken and published strictly in frame order.
        self._workers = config.pipeline.workers
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=f"infer-{config.device_id}")
        # The outbox's one thread: SQLite is used from it alone, and the event loop never waits on fsync.
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"outbox-{config.device_id}")
        self.outbox: Outbox | None = None
        if config.cloud is not None:
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
                meter=self.meter,
            )
        self.forwarder: Forwarder | None = None
        self._run_id = secrets.token_hex(4)
        self._stop: asyncio.Event | None = None
        self._first_frame: float | None = None
        self._last_done: float | None = None
        self._frames_waiting = 0
        self._failures = 0
        self._degraded_by: str | None = None
        self._degraded_since = time.monotonic()
        self.session: MqttSession | None = None
        self.escalator: Escalator | None = None
        self._sends: set[asyncio.Task[Any]] = set()
        self._answers: asyncio.Queue[env.Result] = asyncio.Queue()
        did = config.device_id
        self._local_topic = topics.LOCAL.build(device_id=did)
        self._input_topic = topics.INPUT.build(device_id=did)
        self._result_topic = topics.RESULT.build(device_id=did)
        self._boot_config = boot_config or config
        self._saved_desired = saved_desired
        self._desired: dict[str, dict[str, Any]] = {"fleet": {}, "device": {}}
        self._desired_topics = {
            topics.CONFIG_FLEET.build(fleet=config.fleet): "fleet",
            topics.CONFIG_DESIRED.build(device_id=did): "device",
        }

    # -- the model -----------------------------------------------------------------------

    @property
    def meta(self) -> ModelMeta:
        return self.model.meta

    @property
    def judge(self) -> Judge:
        return self.model.judge

    def load_model(self, path: str | Path) -> ActiveModel:
        """Load a model ready to serve (blocking: call it off the event loop when serving)."""
        engine = create_engine(path, self.profile)
        meta = engine.meta
        return ActiveModel(engine, meta, Preprocessor(meta.input), Judge(self.config.judge, meta.labels))

    def swap_model(self, new: ActiveModel) -> ActiveModel:
        """Serve ``new`` from the next batch on; returns the model it replaced (not closed: a
        batch already running keeps using it, and the caller may still roll back to it)."""
        old, self.model = self.model, new
        self.meter.inc("model_swaps_total")
        log.info("%s: now serving %s %s", self.config.device_id, new.meta.name, new.meta.version)
        if self.session is not None:
            self._spawn(self.session.refresh_presence())
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

    async def run(self) -> AgentSummary:
        cfg = self.config
        self._stop = asyncio.Event()
        resolver = None
        if cfg.broker.uses_mdns:
            from edgewire.discovery import find_broker

            async def resolver() -> tuple[str, int]:
                return await find_broker(cfg.broker)

        session = MqttSession.from_settings(
            cfg.device_id,
            cfg.broker,
            host=cfg.broker.host if cfg.broker.url != "auto" else "",
            resolver=resolver,
            presence=self._presence,
            meter=self.meter,
            persistent=cfg.broker.persistent_session,
            session_expiry_s=cfg.broker.session_expiry_s,
        )
        self.session = session
        if cfg.cloud is not None:
            assert self.outbox is not None
            self.escalator = Escalator(cfg.cloud, self.meter, lambda task: self._publish_final(session, task))
            self.forwarder = Forwarder(
                self.outbox, session, cfg.cloud.outbox, self.meter, on_expired=self._on_expired, io=self._io
            )
        else:
            log.info("%s: no cloud configured: running local-only, hard cases are answered locally", cfg.device_id)
        started = time.monotonic()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if cfg.advertise is not None:
                    from edgewire.mdns import EDGEWIRE_SERVICE, Advertiser

                    txt = {
                        "device_id": cfg.device_id,
                        "fleet": cfg.fleet,
                        "profile": self.profile.name,
                        "models": f"{self.meta.name}={self.meta.version}",
                        "state": self.mode,
                    }
                    await stack.enter_async_context(
                        Advertiser(
                            EDGEWIRE_SERVICE,
                            cfg.device_id,
                            cfg.advertise.port,
                            addresses=[cfg.advertise.address],
                            properties=txt,
                        )
                    )
                await stack.enter_async_context(session)
                elapsed = await self._serve(session, started)
        finally:
            self._executor.shutdown(wait=True)
            self._io.shutdown(wait=True)
            if self.outbox is not None:
                self.outbox.close()
            if self.updater is not None:
                self.updater.close()
            self.model.engine.close()
        m = self.meter
        return AgentSummary(
            device_id=cfg.device_id,
            model=self.meta.name,
            version=self.meta.version,
            mode=self.mode,
            frames=int(m.total("frames_total")),
            completed=int(m.total("frames_completed_total")),
            hard=int(m.total("frames_hard_total")),
            escalated=int(m.total("frames_escalated_total")),
            timeouts=int(m.total("escalations_timed_out_total")),
            failed=int(m.total("frames_failed_total")),
            rejected=int(m.total("messages_rejected_total")),
            elapsed_s=elapsed,
            busy_s=(self._last_done - self._first_frame) if self._first_frame and self._last_done else 0.0,
            late=int(m.total("late_results_total")),
        )

    async def _serve(self, session: MqttSession, started: float) -> float:
        """Subscribe, run the pipeline to its end, wait out escalations; returns seconds run."""
        cfg = self.config
        if isinstance(self.source, QueueSource):
            await session.subscribe(self._input_topic, qos=topics.INPUT.qos)
        if self.escalator is not None:
            await session.subscribe(self._result_topic, qos=topics.RESULT.qos)
        for topic in self._desired_topics:
            await session.subscribe(topic, qos=topics.CONFIG_DESIRED.qos)
        if self.updater is not None:
            for topic_filter, qos in self.updater.subscriptions():
                await session.subscribe(topic_filter, qos=qos)
        if self.outbox is not None:
            await self._recover()
        try:
            await session.wait_connected(cfg.broker.startup_wait_s)
        except NotConnected as exc:
            log.warning("%s: %s; answering locally until the broker is reachable", cfg.device_id, exc)
        sdnotify.notify(f"READY=1\nSTATUS={self.mode}, broker {'up' if session.connected else 'down'}")
        helpers = [
            asyncio.create_task(self._listen(session), name="listen"),
            asyncio.create_task(self._telemetry(session), name="telemetry"),
            asyncio.create_task(sdnotify.watchdog(), name="watchdog"),
        ]
        if self.forwarder is not None:
            helpers += [
                asyncio.create_task(self.forwarder.run(), name="forwarder"),
                asyncio.create_task(self._take_answers(session), name="answers"),
                asyncio.create_task(self._watch_link(session), name="link"),
            ]
        if self.updater is not None:
            helpers.append(asyncio.create_task(self.updater.run(session), name="updater"))
        try:
            await self._pipeline(session)
            if self._sends:
                await asyncio.gather(*self._sends, return_exceptions=True)
            if self.escalator is not None:
                await self.escalator.drain()
            if self.forwarder is not None and session.connected:
                # Hand what is queued to the broker before leaving; what is left stays durable.
                await self.forwarder.wait_empty(2.0)
        finally:
            await cancel_and_wait(*helpers)
            elapsed = time.monotonic() - started
            await self._publish_telemetry(session, elapsed)
        return elapsed

    async def _recover(self) -> None:
        """After a restart: finish what a crash left owed (answers whose deadline passed while
        the device was down are recorded TIMEOUT), and forget answers old enough."""
        assert self.outbox is not None and self.session is not None
        await self._db(self.outbox.forget_settled, _SETTLED_KEEP_S)
        pending = await self._db(self.outbox.waiting)
        queued = len(self.outbox)
        if pending or queued:
            log.info("%s: resuming with %d queued requests, %d answers owed", self.config.device_id, queued, pending)
        self.meter.set("outbox_depth", queued)
        await self._sweep_overdue(self.session)

    # -- pipeline ------------------------------------------------------------------------

    async def _pipeline(self, session: MqttSession) -> None:
        assert self._stop is not None
        stop = self._stop
        frames = Backlog(self.config.pipeline.queue_size)
        # One batch per worker in flight, plus one being published.
        inflight: asyncio.Queue[asyncio.Future[_Batch] | None] = asyncio.Queue(self._workers + 1)
        limit = self.config.source.max_frames

        async def read_source() -> None:
            try:
                async for chunk in chunks(self.source, min(self._max_batch, frames.limit)):
                    if stop.is_set():
                        break
                    if self._first_frame is None:
                        self._first_frame = time.monotonic()
                    if limit is not None and chunk[-1].seq + 1 >= limit:
                        await frames.put([frame for frame in chunk if frame.seq < limit])
                        break
                    await frames.put(chunk)
            except SourceError as exc:
                log.error("%s: source failed: %s", self.config.device_id, exc)
            finally:
                frames.close()

        async def batch() -> None:
            while group := await frames.take(self._max_batch):
                waiting = len(frames)
                self.meter.set("queue_depth", waiting)
                model = self._pick_model(waiting)
                await inflight.put(run_on(self._executor, self._infer, group, model))
            await inflight.put(None)

        async def finish() -> None:
            # Results go out without waiting for each write; all are written before returning.
            window = WriteWindow(session, self.meter, self._workers + 2)
            while (fut := await inflight.get()) is not None:
                await self._finish(session, await fut, window)
            await window.drain()

        reader = asyncio.create_task(read_source(), name="source")
        batcher = asyncio.create_task(batch(), name="batch")
        try:
            await finish()
        finally:
            await cancel_and_wait(reader, batcher)

    def _pick_model(self, waiting: int) -> ActiveModel:
        """The lighter fallback serves while degraded and the frame queue is half full or more."""
        if self.fallback is not None and self.mode == DEGRADED and waiting * 2 >= self.config.pipeline.queue_size:
            self.meter.inc("fallback_batches_total")
            return self.fallback
        return self.model

    def _infer(self, group: list[Frame], model: ActiveModel) -> _Batch:
        """Runs on a worker thread: decode, preprocess, infer and judge one micro-batch."""
        out = _Batch(group, model)
        images: list[np.ndarray] = []
        for i, frame in enumerate(group):
            image = frame.image
            if image is None:
                if frame.path is not None:
                    image = read(str(frame.path), model.pre.gray)
                elif frame.data is not None:
                    image = decode(frame.data, model.pre.gray)
            if image is None or image.size == 0:
                out.failures[i] = "decode"
                continue
            images.append(image)
            out.ok.append(i)
        if not images:
            return out
        sharp = [sharpness(img) for img in images] if model.judge.wants_sharpness else None
        t0 = time.perf_counter()
        try:
            probs = model.engine.infer(model.pre.batch(images))
        except Exception:
            log.exception("%s: inference failed for a batch of %d", self.config.device_id, len(images))
            out.failures.update({i: "inference" for i in out.ok})
            out.ok = []
            return out
        out.infer_s = time.perf_counter() - t0
        out.verdicts = model.judge.judge_batch(probs, sharp)
        if self.config.cloud is not None:
            for j in out.verdicts.hard:
                i = out.ok[j]
                try:
                    out.payloads[i] = group[i].encoded()
                except (OSError, SourceError) as exc:
                    log.warning("%s: cannot escalate %s: %s", self.config.device_id, group[i].ref, exc)
        return out

    async def _finish(self, session: MqttSession, batch: _Batch, window: WriteWindow | None = None) -> None:
        m = self.meter
        m.inc("frames_total", len(batch.frames))
        for i, reason in batch.failures.items():
            m.inc("frames_failed_total", reason=reason)
            log.warning("%s: frame %s skipped: %s failed", self.config.device_id, batch.frames[i].ref, reason)
        if self.updater is not None:
            self.updater.observe(batch.model.meta.version, len(batch.ok), len(batch.failures), batch.infer_s)
        verdicts = batch.verdicts
        if verdicts is None or not len(verdicts):
            return
        frames, meta = batch.frames, batch.model.meta
        # Every frame is answered here at once unless it is hard and has the cloud to go to.
        results = answered_here(
            [frames[i] for i in batch.ok] if batch.failures else frames,
            verdicts,
            device_id=self.config.device_id,
            run_id=self._run_id,
            model=meta.name,
            version=meta.version,
            now=time.time(),
        )
        completed = len(verdicts)
        queued: list[tuple[Task, Message]] = []
        for j in verdicts.hard:
            i = batch.ok[j]
            payload = batch.payloads.get(i)
            if payload is None:
                continue  # nothing to send: answered here, flagged degraded
            frame = frames[i]
            task = Task(trace_id=f"{self._run_id}-{frame.seq}", seq=frame.seq, source_ref=frame.ref, created=frame.ts)
            task.prediction = verdicts.prediction(j)
            task.reasons = verdicts.reasons[j]
            task.model, task.version = meta.name, meta.version
            task.to(TaskState.JUDGED)
            waits = self._can_wait(session)
            if waits:
                task.to(TaskState.PENDING_CLOUD)
                assert self.escalator is not None
                self.escalator.track(task)
                completed -= 1
            else:
                # No link or no room: a hard case is answered here, flagged.
                task.degraded = True
                task.to(TaskState.COMPLETE)
            result = self._local_result(task, verdicts.sharpness[j])
            results.put(j, result)
            if waits or self._queues_offline():
                queued.append((task, self._request(task, result, payload, frame.content_type, waits)))
        if verdicts.hard:
            m.inc("frames_hard_total", len(verdicts.hard))
        if completed:
            m.inc("frames_completed_total", completed)
        self._last_done = time.monotonic()
        if queued:
            self._spawn(self._enqueue(session, queued))
        await self._publish_local(session, results, window)

    def _can_wait(self, session: MqttSession) -> bool:
        """Whether a hard frame may wait for the cloud's answer (else it is answered now)."""
        if self.escalator is None:
            return False
        if self.mode != JOINT or not session.connected:
            self.meter.inc("escalations_skipped_total", reason="degraded")
            return False
        if not self.escalator.has_room():
            self.meter.inc("escalations_skipped_total", reason="backlog")
            return False
        return True

    def _queues_offline(self) -> bool:
        return self.config.cloud is not None and self.config.cloud.offline_deadline_s > 0

    def _request(self, task: Task, result: env.LocalResult, payload: bytes, ctype: str, waits: bool) -> Message:
        cloud = self.config.cloud
        assert cloud is not None and self.escalator is not None and task.prediction is not None
        deadline = self.escalator.deadline_for(task) if waits else time.time() + cloud.offline_deadline_s
        request = env.Request(
            trace_id=task.trace_id,
            device_id=self.config.device_id,
            fleet=self.config.fleet,
            created=task.created,
            deadline=deadline,
            model_hint=cloud.model_hint,
            local=task.prediction,
            reasons=list(task.reasons),
            payload=payload,
            content_type=ctype,
            reply_to=self._result_topic,
        )
        return Message(
            topic=topics.REQUEST.build(device_id=self.config.device_id, trace_id=task.trace_id),
            payload=env.encode(request),
            qos=topics.REQUEST.qos,
            deadline=deadline,
            key=task.trace_id,
            # What finishes the frame when its answer arrives, even after a restart.
            note=env.encode(env.LocalResults(device_id=self.config.device_id, results=[result])),
        )

    async def _enqueue(self, session: MqttSession, queued: list[tuple[Task, Message]]) -> None:
        """Make the requests durable (one group commit), then let the forwarder send them."""
        assert self.outbox is not None and self.forwarder is not None
        try:
            await self._db(self.outbox.put_many, [message for _, message in queued])
        except OutboxFull as exc:
            refused, queued = queued[len(exc.accepted) :], queued[: len(exc.accepted)]
            log.warning("%s: %s", self.config.device_id, exc)
            self.meter.inc("escalations_skipped_total", len(refused), reason="outbox_full")
            for task, _ in refused:
                if self.escalator is not None and self.escalator.cancel(task.trace_id) is not None:
                    task.degraded = True
                    task.to(TaskState.COMPLETE)
                    await self._publish_final(session, task)
        self.meter.inc("frames_escalated_total", len(queued))
        self.meter.inc("bytes_escalated_total", sum(len(message.payload) for _, message in queued))
        self.forwarder.wake()

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _publish_final(self, session: MqttSession, task: Task) -> None:
        """An escalated task reached COMPLETE or TIMEOUT: publish its final outcome."""
        if task.state is TaskState.TIMEOUT and self.outbox is not None:
            settled = await self._settle([(task.trace_id, "expired")])
            if not settled[0]:
                return  # its answer was taken in the same instant and is published as the outcome instead
            self._cloud_failed("timeout")
        self.meter.inc("frames_completed_total")
        self._last_done = time.monotonic()
        await self._publish_local(session, [self._local_result(task, None)])

    async def _settle(self, outcomes: list[tuple[str, Any]]) -> list[bool]:
        """Settle owed answers; a request given up on is still forwarded for audit if so configured."""
        assert self.outbox is not None and self.config.cloud is not None
        keep = self.config.cloud.outbox.late == "forward"
        return await self._db(lambda: self.outbox.settle_many(outcomes, keep_unsent=keep))

    def _local_result(self, task: Task, sharp: float | None) -> env.LocalResult:
        assert task.prediction is not None
        return env.LocalResult(
            trace_id=task.trace_id,
            device_id=self.config.device_id,
            seq=task.seq,
            source_ref=task.source_ref,
            ts=task.created,
            state=task.state.value,
            answered_by=task.answered_by,
            prediction=task.prediction,
            reasons=list(task.reasons),
            sharpness=sharp,
            model=task.model or self.meta.name,
            version=task.version or self.meta.version,
            degraded=task.degraded,
            latency_ms=task.latency_ms,
        )

    async def _publish_local(
        self, session: MqttSession, results: list[env.LocalResult] | LocalRows, window: WriteWindow | None = None
    ) -> None:
        rows = results if isinstance(results, LocalRows) else LocalRows.of(results)
        if self.on_result is not None:
            for result in rows.envelopes():
                self.on_result(result)
        if self.config.publish.local_results and rows:
            payload = rows.encode(self.config.device_id)
            if window is not None:
                await window.publish(self._local_topic, payload, topics.LOCAL.qos)
            else:
                await session.publish(self._local_topic, payload, qos=topics.LOCAL.qos)

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._sends.add(job)
        job.add_done_callback(self._sends.discard)

    # -- answers from the cloud ------------------------------------------------------------

    async def _take_answers(self, session: MqttSession) -> None:
        """Take answers a burst at a time: one transaction settles them all, and only an answer
        that flipped its owed row is used -- a duplicate, even across restarts, is dropped."""
        assert self.outbox is not None
        while True:
            burst = [await self._answers.get()]
            while not self._answers.empty():
                burst.append(self._answers.get_nowait())
            fresh = await self._db(self.outbox.settle_many, [(r.trace_id, "answered") for r in burst])
            for result, new in zip(burst, fresh, strict=True):
                if not new:
                    self.meter.inc("results_ignored_total", reason="duplicate_or_late")
                    continue
                if result.status == "ok":
                    self._cloud_ok()
                elif result.status == "unavailable":
                    self._cloud_failed("unavailable")
                if self.escalator is not None and self.escalator.is_pending(result.trace_id):
                    await self.escalator.resolve(result)
                else:
                    await self._late_answer(session, result)

    async def _late_answer(self, session: MqttSession, result: env.Result) -> None:
        """An answer for a frame already answered locally (queued while degraded) or left
        unfinished by a restart: publish the outcome once more, marked late."""
        assert self.outbox is not None
        note = await self._db(self.outbox.note_of, result.trace_id)
        if note is None:
            self.meter.inc("results_ignored_total", reason="unknown")
            return
        first = env.decode(env.LocalResults, note).results[0]
        unfinished = first.state == TaskState.PENDING_CLOUD.value
        # A frame of this run whose deadline fired as its answer arrived: this is its outcome, on
        # time; one a restart interrupted, or one answered locally while degraded, gets it late.
        on_time = unfinished and result.trace_id.startswith(self._run_id + "-")
        self.meter.inc("late_results_total", status=result.status)
        if result.status == "ok" and result.prediction is not None:
            cloud = result.prediction
            assert self.config.cloud is not None
            update: dict[str, Any] = {"degraded": False}
            if takes_cloud(self.config.cloud, first.prediction, cloud):
                update |= {"prediction": cloud, "answered_by": "cloud", "model": result.model or first.model}
                update["version"] = result.version or first.version
        elif unfinished:
            update = {"degraded": True}
        else:
            return  # an unavailable answer adds nothing to a frame already answered locally
        if unfinished:
            self.meter.inc("frames_completed_total")
        latency = (time.time() - first.ts) * 1000.0
        late = first.model_copy(update={**update, "state": "COMPLETE", "late": not on_time, "latency_ms": latency})
        await self._publish_local(session, [late])

    async def _on_expired(self, items: list[Item]) -> None:
        """Requests the forwarder dropped at their deadline: their frames were answered already."""
        assert self.outbox is not None
        keys = [topics.REQUEST.match(i.topic) for i in items]
        await self._settle([(k["trace_id"], "expired") for k in keys if k is not None])

    async def _sweep_overdue(self, session: MqttSession) -> None:
        """Answers owed past their deadline and not on a timer here (a previous run's) are
        recorded TIMEOUT, so every escalated frame ends with exactly one outcome."""
        assert self.outbox is not None
        overdue = [
            o for o in await self._db(self.outbox.overdue) if not (self.escalator and self.escalator.is_pending(o.key))
        ]
        if not overdue:
            return
        taken = await self._settle([(o.key, "expired") for o in overdue])
        finals = []
        for owed, mine in zip(overdue, taken, strict=True):
            first = env.decode(env.LocalResults, owed.note).results[0]
            if mine and first.state == TaskState.PENDING_CLOUD.value:
                latency = (time.time() - first.ts) * 1000.0
                finals.append(
                    first.model_copy(update={"state": "TIMEOUT", "degraded": True, "late": True, "latency_ms": latency})
                )
        if finals:
            self.meter.inc("escalations_timed_out_total", len(finals))
            self.meter.inc("frames_completed_total", len(finals))
            await self._publish_local(session, finals)

    # -- degraded mode ---------------------------------------------------------------------

    def _set_mode(self, mode: str, reason: str) -> None:
        if mode == self.mode:
            return
        log.warning("%s: %s -> %s (%s)", self.config.device_id, self.mode, mode, reason)
        self.mode = mode
        self._degraded_by = reason if mode == DEGRADED else None
        self._degraded_since = time.monotonic()
        self._failures = 0
        self.meter.inc("mode_transitions_total", to=mode, reason=reason)
        self.meter.set("degraded", 1 if mode == DEGRADED else 0)
        if self.session is not None and self.session.connected:
            self._spawn(self.session.refresh_presence())

    def _cloud_failed(self, reason: str) -> None:
        self._failures += 1
        assert self.config.cloud is not None
        if self.mode == JOINT and self._failures >= self.config.cloud.degraded_after:
            self._set_mode(DEGRADED, reason)

    def _cloud_ok(self) -> None:
        self._failures = 0
        if self.mode == DEGRADED and self.session is not None and self.session.connected:
            self._set_mode(JOINT, "cloud_answered")

    async def _watch_link(self, session: MqttSession) -> None:
        """Degraded while the broker is away; back when it returns. Degraded for the cloud's
        sake (timeouts, unavailable), a trial back to joint after a cool-off."""
        assert self.forwarder is not None
        cooloff = 10.0
        was = session.connected
        connects = session.connects
        if not was:
            self._set_mode(DEGRADED, "link")
        ticks = 0
        while True:
            await asyncio.sleep(0.1)
            now = session.connected
            if now != was or (now and session.connects != connects):
                was, connects = now, session.connects
                if not now:
                    self._set_mode(DEGRADED, "link")
                else:
                    if self._degraded_by == "link":
                        self._set_mode(JOINT, "link")
                    await self.forwarder.link_back()
            elif (
                now
                and self.mode == DEGRADED
                and self._degraded_by != "link"
                and time.monotonic() - self._degraded_since > cooloff
            ):
                self._set_mode(JOINT, "trial")
            ticks += 1
            if ticks % 10 == 0:
                await self._sweep_overdue(session)

    # -- control plane -------------------------------------------------------------------

    async def _listen(self, session: MqttSession) -> None:
        async for message in session.messages():
            try:
                await self._dispatch(str(message.topic), message.payload)
            except (DecodeError, TopicError) as exc:
                reason = "topic" if isinstance(exc, TopicError) else "payload"
                self.meter.inc("messages_rejected_total", reason=reason)
                log.warning("%s: rejected message on %s: %s", self.config.device_id, message.topic, exc)

    async def _dispatch(self, topic: str, payload: Any) -> None:
        parsed = topics.parse(topic)
        data = payload if isinstance(payload, bytes | bytearray) else b""
        if parsed.spec is topics.INPUT and isinstance(self.source, QueueSource):
            frame = env.decode(env.Frame, data)
            if not self.source.offer(frame.frame_id, frame.data, frame.ts, frame.content_type):
                self.meter.inc("frames_dropped_total", reason="backlog")
            return
        if parsed.spec is topics.RESULT and self.escalator is not None:
            result = env.decode(env.Result, data)
            if result.device_id != self.config.device_id:
                raise DecodeError(f"Result for device {result.device_id!r} arrived on {topic}")
            self._answers.put_nowait(result)
            return
        if parsed.spec in (topics.CONFIG_DESIRED, topics.CONFIG_FLEET) and topic in self._desired_topics:
            if not data:  # a cleared retained document
                self._desired[self._desired_topics[topic]] = {}
                await self._save_desired()
                return
            desired = env.decode(env.DesiredConfig, data)
            self._desired[self._desired_topics[topic]] = desired.config
            await self._apply_desired(desired.revision)
            return
        if self.updater is not None and self.updater.wants(parsed):
            await self.updater.handle(parsed, data)
            return
        # An edgewire topic this device never asked for: amqtt hands every new client the retained
        # messages of every filter any client subscribed to. Not an attack, not worth a warning.
        self.meter.inc("messages_ignored_total", family=parsed.spec.name)
        log.debug("%s: ignored a message on %s", self.config.device_id, topic)

    async def _save_desired(self) -> None:
        """Keep the documents in force for the next boot (what waits for a restart gets one);
        written and synced off the event loop, which keeps serving frames meanwhile."""
        if self._saved_desired is None:
            return
        try:
            await asyncio.to_thread(self._saved_desired.save, dict(self._desired))
        except OSError as exc:
            log.warning("%s: desired config not saved for the next boot: %s", self.config.device_id, exc)

    async def _apply_desired(self, revision: int) -> None:
        outcome = remote_config.evaluate(
            self._boot_config, self.config, self._desired["fleet"], self._desired["device"]
        )
        if outcome.status != "rejected":
            await self._save_desired()
            self.config = outcome.config
            self.model = ActiveModel(
                self.model.engine, self.meta, self.model.pre, Judge(self.config.judge, self.meta.labels)
            )
            if self.escalator is not None and self.config.cloud is not None:
                self.escalator.settings = self.config.cloud
        self.meter.inc("config_updates_total", status=outcome.status)
        log.info("%s: desired config r%d %s %s", self.config.device_id, revision, outcome.status, outcome.reason or "")
        report = env.ReportedConfig(
            device_id=self.config.device_id,
            revision=revision,
            status=outcome.status,
            config=self.config.model_dump(mode="json", exclude={"broker": {"password"}}),
            reason=outcome.reason,
            ts=time.time(),
        )
        assert self.session is not None
        await self.session.publish(
            topics.CONFIG_REPORTED.build(device_id=self.config.device_id),
            env.encode(report),
            qos=topics.CONFIG_REPORTED.qos,
            retain=True,
            timeout=10,
        )

    async def _telemetry(self, session: MqttSession) -> None:
        started = time.monotonic()
        last_count, last_t = 0.0, started
        while True:
            await asyncio.sleep(self.config.publish.telemetry_interval_s)
            now = time.monotonic()
            count = self.meter.total("frames_completed_total")
            self.meter.set("pipeline_fps", (count - last_count) / max(now - last_t, 1e-9))
            last_count, last_t = count, now
            await self._publish_telemetry(session, now - started)

    async def _publish_telemetry(self, session: MqttSession, elapsed: float) -> None:
        metrics = self.meter.snapshot()
        metrics["uptime_s"] = elapsed
        payload = env.encode(env.Telemetry(client_id=self.config.device_id, ts=time.time(), metrics=metrics))
        await session.publish(
            topics.TELEMETRY.build(client_id=self.config.device_id), payload, qos=topics.TELEMETRY.qos
        )
