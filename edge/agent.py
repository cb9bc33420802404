"""The device agent: source -> decode/preprocess/infer/judge (worker threads) -> task -> publish.

Decoding, preprocessing, inference and judging run on worker threads, a micro-batch at a time,
so the event loop stays free to read the source and move messages; batches are still finished
strictly in frame order. Hard frames go to the cloud as one request each (when a cloud is
configured and the link is up) and wait for their answer or their deadline; everything else is
answered at once. A missing broker never stops the device: it keeps answering locally.
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
from typing import Any

import numpy as np

from edgewire import envelopes as env
from edgewire import sdnotify, topics
from edgewire.aio import cancel_and_wait
from edgewire.config import DeviceConfig
from edgewire.errors import DecodeError, SourceError, TopicError
from edgewire.metrics import Meter
from edgewire.preprocess import Preprocessor, decode, read, sharpness
from edgewire.profiles import DeviceProfile, load_profile
from edgewire.session import MqttSession, NotConnected, presence_factory

from . import remote_config
from .engines import create_engine
from .escalation import Escalator
from .judge import Judge, Verdict
from .sources import Frame, QueueSource, open_source
from .tasks import Task, TaskState

log = logging.getLogger(__name__)

ResultHook = Callable[[env.LocalResult], None]


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

    @property
    def fps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class _Batch:
    frames: list[Frame]
    ok: list[int] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    #: Encoded bytes of the hard frames, by index in ``frames``, read on the worker thread.
    payloads: dict[int, bytes] = field(default_factory=dict)


class EdgeAgent:
    def __init__(
        self,
        config: DeviceConfig,
        *,
        profile: DeviceProfile | None = None,
        on_result: ResultHook | None = None,
    ) -> None:
        self.config = config
        self.profile = profile or load_profile(config.profile)
        self.engine = create_engine(config.model.path, self.profile)
        self.meta = self.engine.meta
        self.pre = Preprocessor(self.meta.input)
        self.judge = Judge(config.judge, self.meta.labels)
        self.source = open_source(config.source)
        self.meter = Meter(config.device_id)
        self.on_result = on_result
        self.mode = "joint" if config.cloud is not None else "local-only"
        self._max_batch = min(config.pipeline.max_batch, self.profile.limits.max_batch)
        # Batches run on their own worker threads (OpenCV and onnxruntime release the GIL);
        # results are still taken and published strictly in frame order.
        self._workers = config.pipeline.workers
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=f"infer-{config.device_id}")
        self._run_id = secrets.token_hex(4)
        self._stop: asyncio.Event | None = None
        self._first_frame: float | None = None
        self._last_done: float | None = None
        self.session: MqttSession | None = None
        self.escalator: Escalator | None = None
        self._sends: set[asyncio.Task[None]] = set()
        did = config.device_id
        self._local_topic = topics.LOCAL.build(device_id=did)
        self._input_topic = topics.INPUT.build(device_id=did)
        self._result_topic = topics.RESULT.build(device_id=did)
        self._boot_config = config
        self._desired: dict[str, dict[str, Any]] = {"fleet": {}, "device": {}}
        self._desired_topics = {
            topics.CONFIG_FLEET.build(fleet=config.fleet): "fleet",
            topics.CONFIG_DESIRED.build(device_id=did): "device",
        }

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the frames in flight, say goodbye on the presence topic, return."""
        if self._stop is not None:
            self._stop.set()
        if isinstance(self.source, QueueSource):
            self.source.close()

    async def run(self) -> AgentSummary:
        cfg = self.config
        self._stop = asyncio.Event()
        presence = presence_factory(
            cfg.device_id,
            "device",
            profile=self.profile.name,
            fleet=cfg.fleet,
            models={self.meta.name: self.meta.version},
            state=self.mode,
        )
        resolver = None
        if cfg.broker.uses_mdns:
            from edgewire.discovery import find_broker

            async def resolver() -> tuple[str, int]:
                return await find_broker(cfg.broker)

        session = MqttSession(
            cfg.device_id,
            cfg.broker.host if cfg.broker.url != "auto" else "",
            cfg.broker.port,
            resolver=resolver,
            username=cfg.broker.username,
            password=cfg.broker.password,
            keepalive=cfg.broker.keepalive,
            protocol=cfg.broker.protocol,
            presence=presence,
            reconnect_min_s=cfg.broker.reconnect_min_s,
            reconnect_max_s=cfg.broker.reconnect_max_s,
            meter=self.meter,
        )
        self.session = session
        if cfg.cloud is not None:
            self.escalator = Escalator(cfg.cloud, self.meter, lambda task: self._publish_final(session, task))
        else:
            log.info("%s: no cloud configured: running local-only, hard cases are answered locally", cfg.device_id)
        started = time.monotonic()
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
        self._executor.shutdown(wait=True)
        self.engine.close()
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
        try:
            await self._pipeline(session)
            if self._sends:
                await asyncio.gather(*self._sends, return_exceptions=True)
            if self.escalator is not None:
                await self.escalator.drain()
        finally:
            await cancel_and_wait(*helpers)
            elapsed = time.monotonic() - started
            await self._publish_telemetry(session, elapsed)
        return elapsed

    # -- pipeline ------------------------------------------------------------------------

    async def _pipeline(self, session: MqttSession) -> None:
        assert self._stop is not None
        stop = self._stop
        frames: asyncio.Queue[Frame | None] = asyncio.Queue(self.config.pipeline.queue_size)
        # One batch per worker in flight, plus one being published.
        inflight: asyncio.Queue[asyncio.Future[_Batch] | None] = asyncio.Queue(self._workers + 1)
        loop = asyncio.get_running_loop()
        limit = self.config.source.max_frames

        async def read_source() -> None:
            try:
                async for frame in self.source:
                    if stop.is_set():
                        break
                    if self._first_frame is None:
                        self._first_frame = time.monotonic()
                    await frames.put(frame)
                    if limit is not None and frame.seq + 1 >= limit:
                        break
            except SourceError as exc:
                log.error("%s: source failed: %s", self.config.device_id, exc)
            finally:
                await frames.put(None)

        async def batch() -> None:
            done = False
            while not done:
                first = await frames.get()
                if first is None:
                    break
                group = [first]
                while len(group) < self._max_batch and not frames.empty():
                    nxt = frames.get_nowait()
                    if nxt is None:
                        done = True
                        break
                    group.append(nxt)
                self.meter.set("queue_depth", frames.qsize())
                await inflight.put(loop.run_in_executor(self._executor, self._infer, group))
            await inflight.put(None)

        async def finish() -> None:
            while (fut := await inflight.get()) is not None:
                await self._finish(session, await fut)

        reader = asyncio.create_task(read_source(), name="source")
        batcher = asyncio.create_task(batch(), name="batch")
        try:
            await finish()
        finally:
            await cancel_and_wait(reader, batcher)

    def _infer(self, group: list[Frame]) -> _Batch:
        """Runs on a worker thread: decode, preprocess, infer and judge one micro-batch."""
        out = _Batch(group)
        images: list[np.ndarray] = []
        for i, frame in enumerate(group):
            image = frame.image
            if image is None:
                if frame.path is not None:
                    image = read(str(frame.path), self.pre.gray)
                elif frame.data is not None:
                    image = decode(frame.data, self.pre.gray)
            if image is None or image.size == 0:
                out.failures[i] = "decode"
                continue
            images.append(image)
            out.ok.append(i)
        if not images:
            return out
        sharp = [sharpness(img) for img in images] if self.judge.wants_sharpness else None
        try:
            probs = self.engine.infer(self.pre.batch(images))
        except Exception:
            log.exception("%s: inference failed for a batch of %d", self.config.device_id, len(images))
            out.failures.update({i: "inference" for i in out.ok})
            out.ok = []
            return out
        out.verdicts = self.judge.judge(probs, sharp)
        if self.config.cloud is not None:
            for i, verdict in zip(out.ok, out.verdicts, strict=True):
                if verdict.hard:
                    try:
                        out.payloads[i] = group[i].encoded()
                    except (OSError, SourceError) as exc:
                        log.warning("%s: cannot escalate %s: %s", self.config.device_id, group[i].ref, exc)
        return out

    async def _finish(self, session: MqttSession, batch: _Batch) -> None:
        m = self.meter
        m.inc("frames_total", len(batch.frames))
        for i, reason in batch.failures.items():
            m.inc("frames_failed_total", reason=reason)
            log.warning("%s: frame %s skipped: %s failed", self.config.device_id, batch.frames[i].ref, reason)
        if not batch.verdicts:
            return
        results: list[env.LocalResult] = []
        requests: list[tuple[Task, bytes, str]] = []
        hard = 0
        for i, verdict in zip(batch.ok, batch.verdicts, strict=True):
            frame = batch.frames[i]
            task = Task(trace_id=f"{self._run_id}-{frame.seq}", seq=frame.seq, source_ref=frame.ref, created=frame.ts)
            task.prediction = verdict.prediction
            task.reasons = verdict.reasons
            task.to(TaskState.JUDGED)
            if verdict.hard:
                hard += 1
            payload = batch.payloads.get(i)
            if verdict.hard and payload is not None and self._can_escalate(session):
                task.to(TaskState.PENDING_CLOUD)
                assert self.escalator is not None
                self.escalator.track(task)
                requests.append((task, payload, frame.content_type))
            else:
                # No cloud, no link or no room: a hard case is answered here, flagged.
                task.degraded = verdict.hard
                task.to(TaskState.COMPLETE)
                m.inc("frames_completed_total")
            results.append(self._local_result(task, verdict.sharpness))
        if hard:
            m.inc("frames_hard_total", hard)
        self._last_done = time.monotonic()
        for task, payload, ctype in requests:
            self._spawn(self._escalate(session, task, payload, ctype))
        await self._publish_local(session, results)

    def _can_escalate(self, session: MqttSession) -> bool:
        if self.escalator is None:
            return False
        if not session.connected:
            self.meter.inc("escalations_skipped_total", reason="offline")
            return False
        if not self.escalator.has_room():
            self.meter.inc("escalations_skipped_total", reason="backlog")
            return False
        return True

    async def _escalate(self, session: MqttSession, task: Task, payload: bytes, content_type: str) -> None:
        assert self.escalator is not None and self.config.cloud is not None and task.prediction is not None
        request = env.Request(
            trace_id=task.trace_id,
            device_id=self.config.device_id,
            fleet=self.config.fleet,
            created=task.created,
            deadline=self.escalator.deadline_for(task),
            model_hint=self.config.cloud.model_hint,
            local=task.prediction,
            reasons=list(task.reasons),
            payload=payload,
            content_type=content_type,
            reply_to=self._result_topic,
        )
        data = env.encode(request)
        topic = topics.REQUEST.build(device_id=self.config.device_id, trace_id=task.trace_id)
        try:
            await session.publish(topic, data, qos=topics.REQUEST.qos, timeout=self.config.cloud.deadline_ms / 1000)
        except NotConnected as exc:
            # The request never left: answer locally now rather than wait for the deadline.
            if self.escalator.cancel(task.trace_id) is not None:
                log.info("%s: escalation of %s not sent: %s", self.config.device_id, task.trace_id, exc)
                task.degraded = True
                task.to(TaskState.COMPLETE)
                self.meter.inc("escalations_skipped_total", reason="publish_failed")
                await self._publish_final(session, task)
            return
        self.meter.inc("frames_escalated_total")
        self.meter.inc("bytes_escalated_total", len(data))

    async def _publish_final(self, session: MqttSession, task: Task) -> None:
        """An escalated task reached COMPLETE or TIMEOUT: publish its final outcome."""
        self.meter.inc("frames_completed_total")
        self._last_done = time.monotonic()
        await self._publish_local(session, [self._local_result(task, None)])

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

    async def _publish_local(self, session: MqttSession, results: list[env.LocalResult]) -> None:
        if self.on_result is not None:
            for result in results:
                self.on_result(result)
        if self.config.publish.local_results and results:
            message = env.LocalResults(device_id=self.config.device_id, results=results)
            await session.publish(self._local_topic, env.encode(message), qos=topics.LOCAL.qos)

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._sends.add(job)
        job.add_done_callback(self._sends.discard)

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
            await self.escalator.resolve(result)
            return
        if parsed.spec in (topics.CONFIG_DESIRED, topics.CONFIG_FLEET) and topic in self._desired_topics:
            if not data:  # a cleared retained document
                self._desired[self._desired_topics[topic]] = {}
                return
            desired = env.decode(env.DesiredConfig, data)
            self._desired[self._desired_topics[topic]] = desired.config
            await self._apply_desired(desired.revision)
            return
        raise TopicError(f"{topic}: not a topic this device consumes")

    async def _apply_desired(self, revision: int) -> None:
        outcome = remote_config.evaluate(
            self._boot_config, self.config, self._desired["fleet"], self._desired["device"]
        )
        if outcome.status != "rejected":
            self.config = outcome.config
            self.judge = Judge(self.config.judge, self.meta.labels)
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
