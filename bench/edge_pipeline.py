"""Frames per second of the device pipeline against a bare onnxruntime loop, in one run.

pipeline: the EdgeAgent exactly as ``edgewire edge run`` executes it -- folder source, decode,
preprocess, infer (micro-batched), judge, task state machine, and every LocalResult published
to a real broker (Mosquitto when installed, else the embedded amqtt broker in its own process).

bare: what an engineer would write by hand for the same job, with the same resources: the
same frame files in micro-batches of the same size, on a pool of as many threads as the
pipeline has workers, each batch decoded the way the device decodes (straight to gray for a
gray model), put through the same :class:`Preprocessor` and run by an ``InferenceSession``
with the device profile's thread settings -- and nothing else (no broker, no judging, no
results).

Rounds alternate between the two (and which goes first) so that machine noise hits both
alike; the median of each, and of the per-round ratio, is reported. The same pair is also run
with one thread each (``*_1_worker``). On a shared machine the frame rates swing with other
load, so the CPU time each side spends per frame (all its threads; the pipeline's start and
stop taken out by subtracting a short run) is reported too: ``cpu_ratio`` is the frame rate
ratio the two would have on a machine of their own. The last line is one JSON object.

    python bench/edge_pipeline.py [--rounds 7] [--frames 4320] [--workers 2] [--batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import onnxruntime as ort

from edgewire.config import (
    BrokerSettings,
    DeviceConfig,
    ModelSettings,
    PipelineSettings,
    PublishSettings,
    SourceSettings,
)
from edgewire.demo.models import build_demo
from edgewire.edge.agent import EdgeAgent
from edgewire.modelmeta import META_KEY, ModelMeta
from edgewire.ports import free_port, wait_port
from edgewire.preprocess import Preprocessor
from edgewire.profiles import DeviceProfile, load_profile


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe:
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
        kind = "mosquitto"
    else:
        cmd = [sys.executable, "-m", "edgewire.cli", "broker", "--allow-anonymous", "--port", str(port)]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        kind = "amqtt"
    wait_port(port)
    return proc, port, kind


def bare_session(model: Path, profile: DeviceProfile) -> ort.InferenceSession:
    """A session set up as the device sets up its own (threads, optimisation level)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = profile.onnxruntime.intra_op_threads
    opts.inter_op_num_threads = profile.onnxruntime.inter_op_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def bare_fps(session: ort.InferenceSession, files: list[Path], batch: int, workers: int) -> tuple[float, float]:
    """Frames per second, and CPU seconds per frame."""
    meta = ModelMeta.model_validate_json(session.get_modelmeta().custom_metadata_map[META_KEY])
    pre = Preprocessor(meta.input)
    flag = cv2.IMREAD_GRAYSCALE if pre.gray else cv2.IMREAD_COLOR
    feeds, outputs = meta.input.name, [meta.output]
    groups = [[str(p) for p in files[i : i + batch]] for i in range(0, len(files), batch)]

    def run(group: list[str]) -> None:
        session.run(outputs, {feeds: pre.batch([cv2.imread(path, flag) for path in group])})

    with ThreadPoolExecutor(workers) as pool:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in pool.map(run, groups):
            pass
        return len(files) / (time.perf_counter() - t0), (time.process_time() - cpu0) / len(files)


async def pipeline_fps(
    model: Path, frames_dir: Path, n: int, port: int, workers: int, batch: int
) -> tuple[float, float, int]:
    """Frames per second over the pipeline's busy time, CPU seconds of the whole run (start and
    stop included), and messages published."""
    cfg = DeviceConfig(
        device_id="bench-01",
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{port}"),
        source=SourceSettings(kind="folder", path=frames_dir, loop=True, max_frames=n),
        model=ModelSettings(path=model),
        publish=PublishSettings(telemetry_interval_s=60),
        pipeline=PipelineSettings(workers=workers, max_batch=batch),
    )
    cpu0 = time.process_time()
    agent = EdgeAgent(cfg)
    summary = await agent.run()
    cpu = time.process_time() - cpu0
    assert agent.session is not None and summary.completed == n
    return summary.completed / summary.busy_s, cpu, agent.session.published


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--frames", type=int, default=4320, help="frames per round (loops the set)")
    parser.add_argument("--data", type=Path, default=None, help="reuse a demo folder")
    parser.add_argument("--workers", type=int, default=PipelineSettings().workers, help="threads, both sides")
    parser.add_argument("--batch", type=int, default=PipelineSettings().max_batch, help="micro-batch, both sides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        arts = build_demo(args.data or work / "demo")
        files = sorted(arts.frames_dir.glob("*.jpg"))
        loops = max(1, args.frames // len(files))
        bare_files = files * loops
        proc, port, broker_kind = start_broker(work)
        try:
            session = bare_session(arts.edge_model, load_profile(DeviceConfig.model_fields["profile"].default))
            bare_fps(session, files[:64], args.batch, args.workers)  # warm caches
            n, short = len(bare_files), 4 * args.batch
            figures: dict[str, list[float]] = {k: [] for k in ("bare", "pipeline", "bare_1", "pipeline_1")}
            cpu: dict[str, list[float]] = {"bare": [], "pipeline": []}
            published = 0

            def run_bare(threads: int) -> float:
                fps, per_frame = bare_fps(session, bare_files, args.batch, threads)
                if threads == args.workers:
                    cpu["bare"].append(per_frame)
                return fps

            def pipeline(frames: int, workers: int) -> tuple[float, float, int]:
                return asyncio.run(pipeline_fps(arts.edge_model, arts.frames_dir, frames, port, workers, args.batch))

            def run_pipeline(workers: int) -> float:
                nonlocal published
                fps, total, published = pipeline(n, workers)
                if workers == args.workers:
                    _, fixed, _ = pipeline(short, workers)
                    cpu["pipeline"].append((total - fixed) / (n - short))
                return fps

            for r in range(args.rounds):
                # Each pair measured back to back, and who goes first alternates.
                order = [
                    ("bare", run_bare, args.workers),
                    ("pipeline", run_pipeline, args.workers),
                    ("pipeline_1", run_pipeline, 1),
                    ("bare_1", run_bare, 1),
                ]
                for name, run, threads in order if r % 2 == 0 else order[::-1]:
                    figures[name].append(run(threads))
                b, p = figures["bare"][-1], figures["pipeline"][-1]
                b1, p1 = figures["bare_1"][-1], figures["pipeline_1"][-1]
                cb, cp = cpu["bare"][-1] * 1e6, cpu["pipeline"][-1] * 1e6
                print(
                    f"round {r + 1}: bare {b:6.0f} fps   pipeline {p:6.0f} fps (ratio {p / b:4.2f})   "
                    f"1 thread: bare {b1:6.0f} pipeline {p1:6.0f} (ratio {p1 / b1:4.2f})   "
                    f"CPU per frame: bare {cb:5.1f} us, pipeline {cp:5.1f} us (ratio {cb / cp:4.2f})   "
                    f"{published} messages published"
                )
        finally:
            proc.terminate()
            proc.wait(10)

    def median(name: str) -> float:
        return round(statistics.median(figures[name]), 1)

    def ratio(piped: str, bare: str) -> float:
        pairs = zip(figures[piped], figures[bare], strict=True)
        return round(statistics.median(p / b for p, b in pairs), 3)

    result = {
        "pipeline_fps": median("pipeline"),
        "bare_fps": median("bare"),
        "ratio": ratio("pipeline", "bare"),
        "workers": args.workers,
        "batch": args.batch,
        "pipeline_fps_1_worker": median("pipeline_1"),
        "bare_fps_1_thread": median("bare_1"),
        "ratio_1_worker": ratio("pipeline_1", "bare_1"),
        "bare_cpu_us_per_frame": round(statistics.median(cpu["bare"]) * 1e6, 1),
        "pipeline_cpu_us_per_frame": round(statistics.median(cpu["pipeline"]) * 1e6, 1),
        "cpu_ratio": round(statistics.median(b / p for b, p in zip(cpu["bare"], cpu["pipeline"], strict=True)), 3),
        "frames_per_round": len(bare_files),
        "rounds": args.rounds,
        "broker": broker_kind,
        "target_ratio": 0.9,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
