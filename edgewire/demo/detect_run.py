"""The detect demo: the whole system on camera-like digit sequences, scored by mAP@0.5.

Everything is real: an amqtt broker on a free loopback port, Triton serving the demo's digit
classifier behind the bridge (the default route's merge for a classifier is ``relabel``), and a
device running the scikit-learn detector (``edgewire.demo.detector``, YOLOv8 layout, read from
its Ultralytics-style metadata) through its full pipeline: letterbox, inference, decode with NMS,
the per-object judge, crops of the uncertain boxes, tracking, escalation.

The device plays the same frames several times, each a separate run, so every figure comes from
the pipeline as it runs:

- ``edge``: no cloud; its detections score ``map50_edge``.
- ``joint``: crops of uncertain objects go up once per track; the final results score
  ``map50_joint``; objects sent per frame are ``escalations_per_frame.tracking``.
- ``untracked``: the same without tracking: every uncertain object on every frame goes up.
- ``frames``: whole frames go up instead of crops, for the bytes each escalation costs.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgewire import envelopes as env
from edgewire.config import (
    BrokerSettings,
    CloudSettings,
    DetectEscalation,
    DetectSettings,
    DeviceConfig,
    ModelSettings,
    ObjectJudgeSettings,
    PipelineSettings,
    PublishSettings,
    SourceSettings,
    TrackSettings,
)
from edgewire.demo.crop_classifier import CROP_MODEL_NAME, build_crop_classifier
from edgewire.demo.detector import build_detector
from edgewire.demo.mean_ap import ImageEval, mean_ap50
from edgewire.demo.models import build_demo
from edgewire.demo.scenes import scene_sequence
from edgewire.durable import atomic_write
from edgewire.ports import free_port

__all__ = ["DetectFrames", "detect_device_config", "run_detect_demo", "summary_text", "write_detect_frames"]

SEQUENCES = 20
FRAMES_PER_SEQUENCE = 10
SEQUENCE_SEED = 500
#: Boxes scoring below this are no objects; between it and the ceiling they are uncertain.
SCORE_FLOOR = 0.25
UNCERTAIN_CEILING = 0.9
#: The joint runs play the frames as a camera would, so the cloud's answers come back while the
#: objects they are about are still in view (a folder played flat out would outrun them).
CAMERA_FPS = 30.0


@dataclass(frozen=True)
class DetectFrames:
    """The demo's detect frames on disk and their ground truth, by file name."""

    folder: Path
    truth: dict[str, tuple[np.ndarray, np.ndarray]]


def write_detect_frames(folder: Path, sequences: int = SEQUENCES, frames: int = FRAMES_PER_SEQUENCE) -> DetectFrames:
    """Render ``sequences`` drifting-digit sequences as JPEG files (played in name order) and
    ``truth.json`` beside them. Deterministic."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    doc: dict[str, Any] = {}
    for s in range(sequences):
        for t, scene in enumerate(scene_sequence(SEQUENCE_SEED + s, frames)):
            name = f"{s:03d}-{t:02d}.jpg"
            ok, jpeg = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise RuntimeError("OpenCV could not encode a frame")
            atomic_write(folder / name, jpeg.tobytes(), fsync=False)
            truth[name] = (scene.boxes, scene.classes)
            doc[name] = {"boxes": scene.boxes.tolist(), "classes": scene.classes.tolist()}
    atomic_write(folder / "truth.json", (json.dumps(doc) + "\n").encode())
    return DetectFrames(folder, truth)


def detect_device_config(
    model: Path,
    frames: Path,
    broker_url: str,
    *,
    device_id: str = "cam-det",
    cloud: bool = True,
    tracking: bool = True,
    send: str = "crops",
    frame_count: int | None = None,
    loop: bool = False,
    fps: float = 0.0,
    pipeline: PipelineSettings | None = None,
) -> DeviceConfig:
    return DeviceConfig(
        device_id=device_id,
        fleet="demo",
        broker=BrokerSettings(url=broker_url),
        source=SourceSettings(kind="folder", path=frames, max_frames=frame_count, loop=loop, fps=fps),
        model=ModelSettings(path=model),
        detect=DetectSettings(
            score_threshold=SCORE_FLOOR,
            judge=ObjectJudgeSettings(floor=SCORE_FLOOR, ceiling=UNCERTAIN_CEILING),
            escalate=DetectEscalation(send=send),  # type: ignore[arg-type]
            # Frames of a folder are a camera's here: named in time order.
            track=TrackSettings(enabled=tracking),
        ),
        cloud=CloudSettings(deadline_ms=10_000, model_hint="digits") if cloud else None,
        publish=PublishSettings(telemetry_interval_s=60),
        pipeline=pipeline or PipelineSettings(),
    )


@dataclass
class _Run:
    """One device run's results: the first and the final outcome of every frame."""

    first: dict[str, env.LocalResult] = field(default_factory=dict)
    final: dict[str, env.LocalResult] = field(default_factory=dict)

    def add(self, result: env.LocalResult) -> None:
        self.first.setdefault(result.trace_id, result)
        if result.state != "PENDING_CLOUD":
            self.final[result.trace_id] = result


def _score(results: dict[str, env.LocalResult], truth: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
    images = []
    for result in results.values():
        boxes, classes = truth[Path(result.source_ref).name]
        dets = result.detections or []
        images.append(
            ImageEval(
                np.array([d.box for d in dets], np.float32).reshape(-1, 4),
                np.array([d.score for d in dets], np.float32),
                np.array([d.class_index for d in dets], np.int64),
                boxes,
                classes,
            )
        )
    return mean_ap50(images)


async def run_detect_demo(out_dir: Path, *, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build what is missing, run the four device runs against one cloud, return the figures."""
    from edgewire.broker.embedded import EmbeddedBroker
    from edgewire.cloud_bridge.cloud import EmbeddedCloud
    from edgewire.cloud_bridge.rules import Route, Rule, RuleSet, When
    from edgewire.edge.agent import EdgeAgent

    tell = say or (lambda _m: None)
    out_dir = Path(out_dir)
    arts = build_demo(out_dir, progress=lambda m: tell(f"… {m}"))
    tell("… digit detector and crop classifier (trained once, then reused)")
    detector = build_detector(out_dir / "models")
    crops_model = build_crop_classifier(out_dir / "models")
    tell("… rendering the camera sequences")
    frames = write_detect_frames(out_dir / "detect-frames")
    n = len(frames.truth)
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    started = time.monotonic()
    runs: dict[str, _Run] = {}
    agents: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(EmbeddedBroker("127.0.0.1", port, allow_anonymous=True))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgewire-cloud-")))
        tell("starting Triton with the crop classifier (uncertain boxes are relabelled by it) …")
        rules = RuleSet(
            rules=[Rule(name="detect-crops", when=When(task="detect"), route_to=[CROP_MODEL_NAME], merge="relabel")],
            default=Route(route_to=["digits-cloud"]),
        )
        models = [crops_model.path, arts.cloud_model]
        await stack.enter_async_context(EmbeddedCloud(BrokerSettings(url=url), models, workdir, rules=rules))
        plan = {
            "edge": {"cloud": False},
            "joint": {"cloud": True, "tracking": True, "send": "crops", "fps": CAMERA_FPS},
            "untracked": {"cloud": True, "tracking": False, "send": "crops", "fps": CAMERA_FPS},
            "frames": {"cloud": True, "tracking": True, "send": "frame", "fps": CAMERA_FPS},
        }
        for name, options in plan.items():
            run = runs[name] = _Run()
            cfg = detect_device_config(detector.path, frames.folder, url, device_id=f"cam-{name}", **options)  # type: ignore[arg-type]
            agent = agents[name] = EdgeAgent(cfg, on_result=run.add)
            summary = await agent.run()
            done = f"{summary.completed} frames, {summary.escalated} escalated, {summary.timeouts} timeouts"
            tell(f"run '{name}': {done}")
    joint, untracked, frame_run = agents["joint"], agents["untracked"], agents["frames"]

    def per_frame(value: float) -> float:
        return round(value / n, 3)

    def bytes_each(agent: Any) -> int:
        sent = agent.meter.total("frames_escalated_total")
        return round(agent.meter.total("bytes_escalated_total") / sent) if sent else 0

    assert joint.object_frames.tracks is not None
    result = {
        "frames": n,
        "objects": int(sum(len(c) for _, c in frames.truth.values())),
        "map50_edge": round(_score(runs["edge"].final, frames.truth), 4),
        "map50_joint": round(_score(runs["joint"].final, frames.truth), 4),
        "map50_joint_untracked": round(_score(runs["untracked"].final, frames.truth), 4),
        "escalations_per_frame": {
            "tracking": per_frame(joint.object_frames.tracks.once.escalated),
            "no_tracking": per_frame(untracked.meter.total("objects_uncertain_total")),
        },
        "requests_per_frame": {
            "tracking": per_frame(joint.meter.total("frames_escalated_total")),
            "no_tracking": per_frame(untracked.meter.total("frames_escalated_total")),
        },
        "escalations_saved": joint.object_frames.tracks.once.saved,
        "bytes_per_escalation": {"crops": bytes_each(joint), "frame": bytes_each(frame_run)},
        "timeouts": int(sum(a.meter.total("frames_timeout_total") for a in agents.values())),
        "train_seconds": round(detector.train_seconds + crops_model.train_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    return result


def summary_text(result: dict[str, Any]) -> str:
    """The closing summary, one figure a line, saying what each is."""
    esc, req, size = result["escalations_per_frame"], result["requests_per_frame"], result["bytes_per_escalation"]
    return "\n".join(
        [
            f"mAP@0.5 on {result['frames']} frames ({result['objects']} digits), against the true boxes:",
            f"  edge only            {result['map50_edge']:.3f}  the device's detector alone",
            f"  joint                {result['map50_joint']:.3f}  uncertain objects relabelled in the cloud, "
            "once per track",
            f"  joint, every frame   {result['map50_joint_untracked']:.3f}  the same without tracking",
            f"objects sent up per frame: {esc['tracking']} with tracking, {esc['no_tracking']} without "
            f"({result['escalations_saved']} escalations saved); "
            f"requests per frame {req['tracking']} / {req['no_tracking']}",
            f"bytes per escalation: {size['crops']} with crops of the uncertain boxes, "
            f"{size['frame']} with whole frames",
            f"{result['timeouts']} escalations not answered in time; {result['seconds']} s",
        ]
    )
