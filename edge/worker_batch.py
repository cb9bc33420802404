"""What a worker thread makes of one micro-batch: decoded, preprocessed, inferred, judged, and
for a classifier its local answers made and packed for the wire.

All of it runs on the worker that has the batch in hand, so the event loop only finishes batches
in frame order (``EdgeAgent._finish``) and the workers do not wait for it to hand back the
interpreter while it builds answers. A detector's batch is handed to :mod:`.object_frames`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edgewire.config import DeviceConfig
from edgewire.errors import SourceError
from edgewire.preprocess import ImageRejected, decode, read, sharpness

from .active_model import ActiveModel
from .judge import Verdicts
from .local_results import LocalRows, answered_here
from .object_frames import DetectedBatch, ObjectFrames
from .sources import Frame
from .tasks import new_trace_ids

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch as a worker leaves it for the event loop to finish in frame order."""

    frames: list[Frame]
    model: ActiveModel
    #: Indices in ``frames`` of the frames decoded, in order; ``verdicts`` are theirs.
    ok: list[int] = field(default_factory=list)
    verdicts: Verdicts | None = None
    #: A detector's batch instead (``verdicts`` stays None).
    objects: DetectedBatch | None = None
    failures: dict[int, str] = field(default_factory=dict)
    #: Encoded bytes of the hard frames, by index in ``frames``, read on the worker thread.
    payloads: dict[int, bytes] = field(default_factory=dict)
    infer_s: float = 0.0
    #: A classifier's answers as made on the worker (every frame complete, a hard one flagged
    #: degraded), and their trace ids; the event loop changes only the frames it escalates.
    answers: LocalRows | None = None
    trace_ids: list[str] = field(default_factory=list)


def work_batch(
    group: list[Frame], model: ActiveModel, config: DeviceConfig, object_frames: ObjectFrames, *, keep_rows: bool = True
) -> Batch:
    """Decode, preprocess, infer and judge one micro-batch (on a worker thread); a frame that
    cannot be read, or a batch whose inference fails, is left in ``failures`` for the loop.
    ``keep_rows``: someone reads each answer as an object (else a batch with nothing to
    escalate keeps its answers as wire bytes alone)."""
    out = Batch(group, model)
    images: list[np.ndarray] = []
    for i, frame in enumerate(group):
        image = frame.image
        if image is None:
            if frame.path is not None:
                image = read(str(frame.path), model.pre.gray)
            elif frame.data is not None:
                try:
                    image = decode(frame.data, model.pre.gray)
                except ImageRejected as exc:
                    log.warning("%s: frame %s refused: %s", config.device_id, frame.ref, exc)
                    out.failures[i] = "rejected"
                    continue
        if image is None or image.size == 0:
            out.failures[i] = "decode"
            continue
        images.append(image)
        out.ok.append(i)
    if not images:
        return out
    if model.detects:
        escalate = config.detect.escalate if config.cloud is not None else None
        out.objects = object_frames.infer(group, out.ok, images, model, escalate)
        if out.objects is None:
            out.failures.update({i: "inference" for i in out.ok})
            out.ok = []
        else:
            out.infer_s = out.objects.infer_s
        return out
    sharp = [sharpness(img) for img in images] if model.judge.wants_sharpness else None
    t0 = time.perf_counter()
    try:
        probs = model.engine.infer(model.pre.batch(images))
        # Judged inside the guard: an output the load-time check could not pin (open
        # dimensions) fails this batch, counted, never the device.
        out.verdicts = model.judge.judge_batch(probs, sharp)
    except Exception:
        log.exception("%s: inference failed for a batch of %d", config.device_id, len(images))
        out.failures.update({i: "inference" for i in out.ok})
        out.ok = []
        return out
    out.infer_s = time.perf_counter() - t0
    # The answers are made here, by the worker that has the batch in hand, rather than on the
    # event loop while both workers wait for it to hand back the interpreter.
    meta = model.meta
    out.trace_ids = new_trace_ids(len(out.ok))
    out.answers = answered_here(
        [group[i] for i in out.ok] if out.failures else group,
        out.verdicts,
        device_id=config.device_id,
        trace_ids=out.trace_ids,
        model=meta.name,
        version=meta.version,
        now=time.time(),
    )
    if config.publish.local_results:
        if keep_rows or (config.cloud is not None and out.verdicts.hard):
            out.answers.packed()
        else:  # nothing will change or read these rows: dropped here, while in this core's cache
            out.answers.seal()
            out.trace_ids = []
    if config.cloud is not None:
        for j in out.verdicts.hard:
            i = out.ok[j]
            try:
                out.payloads[i] = group[i].encoded()
            except (OSError, SourceError) as exc:
                log.warning("%s: cannot escalate %s: %s", config.device_id, group[i].ref, exc)
    return out
