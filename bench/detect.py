"""The detect demo's figures and the device's detection pipeline against a hand-written loop.

Quality (one whole-system run, ``edgewire.demo.detect_run``): mAP@0.5 of the device's detector
alone and of the joint answers (uncertain boxes relabelled by the cloud's crop classifier, once
per track), objects escalated per frame with and without tracking, and bytes per escalation
with crops against whole frames.

Speed (``pipeline_ratio``): frames per second of the EdgeAgent running the detector exactly as
``edgewire edge run`` does (folder source, JPEG decode, letterbox, micro-batched inference,
decode with class-aware NMS, the per-object judge, every LocalResult published to a real broker)
against what an engineer would write by hand for the same job with the same resources: the same
files in micro-batches of the same size on a pool of as many threads as the pipeline has
workers, ``cv2.imread``, a letterbox, an ``InferenceSession`` with the device profile's thread
settings, the YOLOv8 decode (best class, threshold, ``cv2.dnn.NMSBoxesBatched``) and the
letterbox undone -- and nothing else. Rounds alternate who goes first; medians are reported.
On a shared machine frame rates swing with other load, so the CPU time each side spends per
frame (all its threads; the pipeline's start and stop included, which only counts against it)
is reported too: ``cpu_ratio`` is the frame-rate ratio the two would have on a machine of their
own. The last line is one JSON object.

    python bench/detect.py [--rounds 3] [--frames 1000] [--workers 2] [--batch 16] [--data DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_pipeline import start_broker

from edgewire.config import DeviceConfig, PipelineSettings
from edgewire.demo.detect_run import SCORE_FLOOR, detect_device_config, run_detect_demo
from edgewire.edge.agent import EdgeAgent
from edgewire.profiles import DeviceProfile, load_profile

IOU = 0.45  # the device's default NMS threshold
MAX_DETECTIONS = 100


def bare_session(model: Path, profile: DeviceProfile) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = profile.onnxruntime.intra_op_threads
    opts.inter_op_num_threads = profile.onnxruntime.inter_op_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    nw, nh = round(w * r), round(h * r)
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    left, top = round((size - nw) / 2 - 0.1), round((size - nh) / 2 - 0.1)
    out = cv2.copyMakeBorder(
        image, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT, value=(114, 114, 114)
    )
    return out, r, left, top


def decode(rows: np.ndarray, r: float, left: int, top: int, w: int, h: int) -> tuple[np.ndarray, ...]:
    """One image's [4+C, N] output to boxes, scores, classes in source pixels."""
    rows = rows.T
    scores_all = rows[:, 4:]
    classes = scores_all.argmax(axis=1)
    scores = scores_all[np.arange(len(rows)), classes]
    keep = scores >= SCORE_FLOOR
    xywh, scores, classes = rows[keep, :4], scores[keep], classes[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, 2:]], axis=1)  # x, y, w, h for OpenCV
    idx = np.asarray(cv2.dnn.NMSBoxesBatched(boxes, scores, classes.astype(np.int32), 0.0, IOU), np.int64).reshape(-1)
    idx = idx[:MAX_DETECTIONS]
    xyxy = np.concatenate([boxes[idx, :2], boxes[idx, :2] + boxes[idx, 2:]], axis=1)
    xyxy[:, 0::2] = np.clip((xyxy[:, 0::2] - left) / r, 0, w)
    xyxy[:, 1::2] = np.clip((xyxy[:, 1::2] - top) / r, 0, h)
    return xyxy, scores[idx], classes[idx]


def bare_fps(session: ort.InferenceSession, files: list[Path], batch: int, workers: int) -> float:
    size = session.get_inputs()[0].shape[2]
    name = session.get_inputs()[0].name
    groups = [[str(p) for p in files[i : i + batch]] for i in range(0, len(files), batch)]

    def run(group: list[str]) -> int:
        images = [cv2.imread(path, cv2.IMREAD_COLOR) for path in group]
        boxed = [letterbox(img, size) for img in images]
        tensor = np.stack([b[0][:, :, ::-1] for b in boxed]).astype(np.float32)
        tensor *= 1.0 / 255.0
        tensor = np.ascontiguousarray(tensor.transpose(0, 3, 1, 2))
        (out,) = session.run(None, {name: tensor})
        found = 0
        for rows, (_, r, left, top), img in zip(out, boxed, images, strict=True):
            found += len(decode(rows, r, left, top, img.shape[1], img.shape[0])[0])
        return found

    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        for _ in pool.map(run, groups):
            pass
        return len(files) / (time.perf_counter() - t0)


async def pipeline_fps(model: Path, frames: Path, n: int, port: int, workers: int, batch: int) -> float:
    cfg = detect_device_config(
        model,
        frames,
        f"mqtt://127.0.0.1:{port}",
        device_id="bench-det",
        cloud=False,
        tracking=False,
        frame_count=n,
        loop=True,
        pipeline=PipelineSettings(workers=workers, max_batch=batch),
    )
    agent = EdgeAgent(cfg)
    summary = await agent.run()
    assert summary.completed == n, summary
    return summary.completed / summary.busy_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=1000, help="frames per speed round (loops the set)")
    parser.add_argument("--data", type=Path, default=None, help="demo folder to build in or reuse")
    parser.add_argument("--workers", type=int, default=PipelineSettings().workers, help="threads, both sides")
    parser.add_argument("--batch", type=int, default=PipelineSettings().max_batch, help="micro-batch, both sides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or work / "demo"
        quality = asyncio.run(run_detect_demo(data))
        model = data / "models" / "digits-detect.onnx"
        frames = data / "detect-frames"
        files = sorted(frames.glob("*.jpg"))
        bare_files = (files * (args.frames // len(files) + 1))[: args.frames]
        proc, port, broker_kind = start_broker(work)
        try:
            session = bare_session(model, load_profile(DeviceConfig.model_fields["profile"].default))
            bare_fps(session, files[:64], args.batch, args.workers)  # warm caches
            figures: dict[str, list[float]] = {"bare": [], "pipeline": []}
            cpu: dict[str, list[float]] = {"bare": [], "pipeline": []}
            for r in range(args.rounds):
                order = [
                    ("bare", lambda: bare_fps(session, bare_files, args.batch, args.workers)),
                    (
                        "pipeline",
                        lambda: asyncio.run(
                            pipeline_fps(model, frames, len(bare_files), port, args.workers, args.batch)
                        ),
                    ),
                ]
                for name, run in order if r % 2 == 0 else order[::-1]:
                    cpu0 = time.process_time()
                    figures[name].append(run())
                    cpu[name].append((time.process_time() - cpu0) / len(bare_files))
                b, p = figures["bare"][-1], figures["pipeline"][-1]
                cb, cp = cpu["bare"][-1] * 1e6, cpu["pipeline"][-1] * 1e6
                print(
                    f"round {r + 1}: bare {b:6.0f} fps   pipeline {p:6.0f} fps (ratio {p / b:4.2f})   "
                    f"CPU per frame: bare {cb:6.0f} us, pipeline {cp:6.0f} us (ratio {cb / cp:4.2f})"
                )
        finally:
            proc.terminate()
            proc.wait(10)

    pairs = zip(figures["pipeline"], figures["bare"], strict=True)
    result = {
        "map50_edge": quality["map50_edge"],
        "map50_joint": quality["map50_joint"],
        "map50_joint_untracked": quality["map50_joint_untracked"],
        "escalations_per_frame": quality["escalations_per_frame"],
        "requests_per_frame": quality["requests_per_frame"],
        "bytes_per_escalation": quality["bytes_per_escalation"],
        "pipeline_ratio": round(statistics.median(p / b for p, b in pairs), 3),
        "pipeline_fps": round(statistics.median(figures["pipeline"]), 1),
        "bare_fps": round(statistics.median(figures["bare"]), 1),
        "cpu_ratio": round(statistics.median(b / p for b, p in zip(cpu["bare"], cpu["pipeline"], strict=True)), 3),
        "bare_cpu_us_per_frame": round(statistics.median(cpu["bare"]) * 1e6, 1),
        "pipeline_cpu_us_per_frame": round(statistics.median(cpu["pipeline"]) * 1e6, 1),
        "workers": args.workers,
        "batch": args.batch,
        "frames": quality["frames"],
        "frames_per_speed_round": len(bare_files),
        "rounds": args.rounds,
        "broker": broker_kind,
        "target_ratio": 0.9,
        "target_map50_gain": 0.05,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
