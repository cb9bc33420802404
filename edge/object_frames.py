"""A detector's frames, between the agent's run loop and the wire.

On a worker thread (:meth:`ObjectFrames.infer`): letterbox, infer, decode with NMS, judge each
object, and read what goes up for the hard frames (the frame, or crops of its uncertain boxes).
Back on the event loop, in frame order (:meth:`ObjectFrames.finish`): track ids, the objects
already asked about kept back, the hard frames escalated, and every frame's local result.

The agent owns the loop, the batching and publishing; it hands a detector's batches here and
nothing of a classifier's, so the two frame paths change independently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgewire import envelopes as env
from edgewire.config import DetectEscalation, DeviceConfig
from edgewire.detection import decode_batch
from edgewire.errors import SourceError
from edgewire.metrics import Meter
from edgewire.modelmeta import ModelMeta

from .active_model import ActiveModel
from .escalation import Escalations
from .object_judge import ObjectVerdicts, crops_of
from .sources import Frame
from .tasks import Task, TaskState, new_trace_ids
from .track_escalation import ObjectTracks

log = logging.getLogger(__name__)

#: Builds a frame's local result from its task (the agent's one builder, shared with classifiers).
LocalResultOf = Callable[[Task], env.LocalResult]


@dataclass
class DetectedBatch:
    """What the worker thread made of a detector's micro-batch."""

    objects: ObjectVerdicts
    #: Crops of the uncertain boxes of hard frames, by index in the batch's frames (``send: crops``).
    crops: dict[int, list[env.Crop]]
    #: What goes up for each hard frame, by index in the batch's frames: its encoded bytes, or
    #: ``b""`` when its crops go instead.
    payloads: dict[int, bytes]
    infer_s: float


class ObjectFrames:
    """A device's detector frames: judged per object, tracked across frames (video, camera and
    MQTT sources unless configured otherwise), escalated once per uncertain track."""

    def __init__(
        self, config: DeviceConfig, meter: Meter, escalations: Escalations | None, local_result: LocalResultOf
    ) -> None:
        self.device_id = config.device_id
        self.meter = meter
        self.escalations = escalations
        self._local_result = local_result
        track = config.detect.track
        tracking = track.enabled if track.enabled is not None else config.source.kind != "folder"
        self.tracks: ObjectTracks | None = ObjectTracks(track) if tracking else None

    def infer(
        self,
        frames: Sequence[Frame],
        ok: Sequence[int],
        images: list[np.ndarray],
        model: ActiveModel,
        escalate: DetectEscalation | None,
    ) -> DetectedBatch | None:
        """Runs on a worker thread. ``images`` are the decoded frames ``frames[i] for i in ok``;
        ``escalate`` is None when there is no cloud to escalate to. None when inference failed
        (logged here; the agent counts the frames)."""
        assert model.objects is not None and model.meta.detect is not None
        geometries = [model.pre.geometry(img) for img in images]
        t0 = time.perf_counter()
        try:
            raw = model.engine.infer(model.pre.batch(images))
            spec = model.meta.input
            found = decode_batch(raw, model.meta.detect.format, geometries, model.decode, (spec.height, spec.width))
        except Exception:
            log.exception("%s: inference failed for a batch of %d", self.device_id, len(images))
            return None
        infer_s = time.perf_counter() - t0
        objects = model.objects.judge_batch(found, images if model.objects.settings.min_sharpness else None)
        out = DetectedBatch(objects, {}, {}, infer_s)
        if escalate is None:
            return out
        for j in objects.hard:
            i = ok[j]
            if escalate.send == "crops" and (crops := crops_of(images[j], objects.frames[j], escalate)):
                out.crops[i] = crops
                out.payloads[i] = b""
                continue
            try:
                out.payloads[i] = frames[i].encoded()
            except (OSError, SourceError) as exc:
                log.warning("%s: cannot escalate %s: %s", self.device_id, frames[i].ref, exc)
        return out

    def finish(
        self, frames: Sequence[Frame], ok: Sequence[int], batch: DetectedBatch, meta: ModelMeta
    ) -> list[env.LocalResult]:
        """Every decoded frame's local result, in frame order, the hard ones escalated with their
        frame or their crops (or answered here, flagged degraded, when they cannot wait)."""
        objects = batch.objects
        if not len(objects):
            return []
        esc = self.escalations
        results: list[env.LocalResult] = []
        completed = len(objects)
        hard = set(objects.hard)
        trace_ids = new_trace_ids(len(ok))
        for j, i in enumerate(ok):
            frame, judged = frames[i], objects.frames[j]
            task = Task(trace_id=trace_ids[j], seq=frame.seq, source_ref=frame.ref, created=frame.ts)
            task.detections = objects.wire(j)
            crops = batch.crops.get(i)
            if self.tracks is not None:
                tracked = self.tracks.observe(judged, task.detections, crops)
                task.detections, crops = tracked.detections, tracked.crops
                if not tracked.escalate:
                    hard.discard(j)
            task.reasons = judged.reasons if j in hard else ()
            task.model, task.version = meta.name, meta.version
            task.to(TaskState.JUDGED)
            payload = batch.payloads.get(i)
            sendable = j in hard and payload is not None and esc is not None
            waits = sendable and esc is not None and esc.may_wait()
            if waits:
                task.to(TaskState.PENDING_CLOUD)
                completed -= 1
            else:
                task.degraded = j in hard
                task.to(TaskState.COMPLETE)
            result = self._local_result(task)
            results.append(result)
            if sendable and esc is not None and payload is not None and (waits or esc.queues_offline):
                esc.escalate(task, result, payload, frame.content_type, crops=crops)
        self._count(objects, hard, completed, results)
        return results

    def _count(self, objects: ObjectVerdicts, hard: set[int], completed: int, results: list[env.LocalResult]) -> None:
        m = self.meter
        if hard:
            m.inc("frames_hard_total", len(hard))
            m.inc("objects_uncertain_total", sum(int(objects.frames[j].uncertain.sum()) for j in hard))
        m.inc("objects_total", sum(len(f.detections) for f in objects.frames))
        if self.tracks is not None:
            m.set("objects_escalated", self.tracks.once.escalated)
            m.set("escalations_saved", self.tracks.once.saved)
        if completed:
            m.inc("frames_completed_total", completed)
        for r in results:
            if r.state == TaskState.COMPLETE.value:
                m.observe("frame_latency_ms", r.latency_ms, path="local")

    def answered(self, results: Sequence[env.LocalResult]) -> None:
        """Final outcomes of escalated frames: the cloud's answers stick to their tracks."""
        if self.tracks is not None:
            self.tracks.answered(results)
