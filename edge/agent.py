"""The device agent: source -> decode/preprocess/infer (one thread) -> judge -> task -> publish.

Decoding, preprocessing and inference run in one dedicated thread, a micro-batch at a time, so
the event loop stays free to read the source and publish results; while the loop publishes
batch k the thread already works on batch k+1. A missing broker never stops the device: it
keeps answering locally and QoS 0 results are dropped and counted until the link returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgewire import envelopes as env
from edgewire import sdnotify, topics
from edgewire.config import DeviceConfig
from edgewire.errors import DecodeError, TopicError
from edgewire.metrics import Meter
from edgewire.preprocess import Preprocessor, decode, read, sharpness
from edgewire.profiles import DeviceProfile, load_profile
from edgewire.session import MqttSession, NotConnected, presence_factory

from .engines import create_engine
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
    probs: np.ndarray | None
    ok: list[int]
    sharpness: list[float | None] | None
    failures: dict[int, str]


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
        # results are still taken, judged and published strictly in frame order.
        self._workers = config.pipeline.workers
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=f"infer-{config.device_id}")
        self._run_id = secrets.token_hex(4)
        self._stop: asyncio.Event | None = None
        self._first_frame: float | None = None
        self._last_done: float | None = None
        self.session: MqttSession | None = None
        self._local_topic = topics.LOCAL.build(device_id=config.device_id)
        self._input_topic = topics.INPUT.build(device_id=config.device_id)

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
            models={self.meta.name: self.meta.version},
            state=self.mode,
        )
        session = MqttSession(
            cfg.device_id,
            cfg.broker.host,
            cfg.broker.port,
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
        if self.mode == "local-only":
            log.info("%s: no cloud configured: running local-only, hard cases are answered locally", cfg.device_id)
        started = time.monotonic()
        async with session:
            if isinstance(self.source, QueueSource):
                await session.subscribe(self._input_topic, qos=topics.INPUT.qos)
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
            finally:
                for task in helpers:
                    task.cancel()
                for task in helpers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                elapsed = time.monotonic() - started
                await self._publish_telemetry(session, elapsed)
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
            failed=int(m.total("frames_failed_total")),
            rejected=int(m.total("messages_rejected_total")),
            elapsed_s=elapsed,
            busy_s=(self._last_done - self._first_frame) if self._first_frame and self._last_done else 0.0,
        )

    # -- pipeline ------------------------------------------------------------------------

    async def _pipeline(self, session: MqttSession) -> None:
        assert self._stop is not None
        frames: asyncio.Queue[Frame | None] = asyncio.Queue(self.config.pipeline.queue_size)
        # One batch per worker in flight, plus one being published.
        inflight: asyncio.Queue[tuple[list[Frame], asyncio.Future[_Batch]] | None] = asyncio.Queue(self._workers + 1)
        loop = asyncio.get_running_loop()

        limit = self.config.source.max_frames

        async def read() -> None:
            try:
                async for frame in self.source:
                    if self._stop.is_set():
                        break
                    if self._first_frame is None:
                        self._first_frame = time.monotonic()
                    await frames.put(frame)
                    if limit is not None and frame.seq + 1 >= limit:
                        break
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
                fut = loop.run_in_executor(self._executor, self._infer, group)
                await inflight.put((group, fut))
            await inflight.put(None)

        async def publish() -> None:
            while (item := await inflight.get()) is not None:
                await self._finish(session, await item[1])

        reader = asyncio.create_task(read(), name="source")
        batcher = asyncio.create_task(batch(), name="batch")
        try:
            await publish()
        finally:
            for task in (reader, batcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _infer(self, group: list[Frame]) -> _Batch:
        """Runs on the inference thread: decode, preprocess, infer one micro-batch."""
        images: list[np.ndarray] = []
        ok: list[int] = []
        failures: dict[int, str] = {}
        for i, frame in enumerate(group):
            image = frame.image
            if image is None:
                if frame.path is not None:
                    image = read(str(frame.path), self.pre.gray)
                elif frame.data is not None:
                    image = decode(frame.data, self.pre.gray)
            if image is None or image.size == 0:
                failures[i] = "decode"
                continue
            images.append(image)
            ok.append(i)
        if not images:
            return _Batch(group, None, ok, None, failures)
        sharp = [sharpness(img) for img in images] if self.judge.wants_sharpness else None
        try:
            probs = self.engine.infer(self.pre.batch(images))
        except Exception:
            log.exception("%s: inference failed for a batch of %d", self.config.device_id, len(images))
            failures.update({i: "inference" for i in ok})
            return _Batch(group, None, [], None, failures)
        return _Batch(group, probs, ok, sharp, failures)

    async def _finish(self, session: MqttSession, batch: _Batch) -> None:
        m = self.meter
        m.inc("frames_total", len(batch.frames))
        for i, reason in batch.failures.items():
            m.inc("frames_failed_total", reason=reason)
            log.warning("%s: frame %s skipped: %s failed", self.config.device_id, batch.frames[i].ref, reason)
        if batch.probs is None:
            return
        verdicts = self.judge.judge(batch.probs, batch.sharpness)
        results = [self._complete(batch.frames[i], v) for i, v in zip(batch.ok, verdicts, strict=True)]
        m.inc("frames_completed_total", len(results))
        hard = sum(1 for v in verdicts if v.hard)
        if hard:
            m.inc("frames_hard_total", hard)
        self._last_done = time.monotonic()
        if self.on_result is not None:
            for result in results:
                self.on_result(result)
        if self.config.publish.local_results:
            batch_msg = env.LocalResults(device_id=self.config.device_id, results=results)
            await session.publish(self._local_topic, env.encode(batch_msg), qos=topics.LOCAL.qos)

    def _complete(self, frame: Frame, verdict: Verdict) -> env.LocalResult:
        task = Task(
            trace_id=f"{self._run_id}-{frame.seq}",
            seq=frame.seq,
            source_ref=frame.ref,
            created=frame.ts,
        )
        task.prediction = verdict.prediction
        task.reasons = verdict.reasons
        task.to(TaskState.JUDGED)
        # Local-only: a hard case is still answered here, flagged as not checked by the cloud.
        task.degraded = verdict.hard
        task.to(TaskState.COMPLETE)
        return env.LocalResult(
            trace_id=task.trace_id,
            device_id=self.config.device_id,
            seq=task.seq,
            source_ref=task.source_ref,
            ts=task.created,
            state=task.state.value,
            answered_by=task.answered_by,
            prediction=verdict.prediction,
            reasons=list(task.reasons),
            sharpness=verdict.sharpness,
            model=self.meta.name,
            version=self.meta.version,
            degraded=task.degraded,
            latency_ms=task.latency_ms,
        )

    # -- control plane -------------------------------------------------------------------

    async def _listen(self, session: MqttSession) -> None:
        async for message in session.messages():
            try:
                self._dispatch(str(message.topic), message.payload)
            except (DecodeError, TopicError) as exc:
                reason = "topic" if isinstance(exc, TopicError) else "payload"
                self.meter.inc("messages_rejected_total", reason=reason)
                log.warning("%s: rejected message on %s: %s", self.config.device_id, message.topic, exc)

    def _dispatch(self, topic: str, payload: Any) -> None:
        parsed = topics.parse(topic)
        if parsed.spec is topics.INPUT and isinstance(self.source, QueueSource):
            frame = env.decode(env.Frame, payload if isinstance(payload, bytes | bytearray) else b"")
            if not self.source.offer(frame.frame_id, frame.data, frame.ts, frame.content_type):
                self.meter.inc("frames_dropped_total", reason="backlog")
            return
        raise TopicError(f"{topic}: not a topic this device consumes")

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
