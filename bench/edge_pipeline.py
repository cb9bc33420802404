"""Frames per second of the device pipeline against a bare onnxruntime loop, in one run.

pipeline: the EdgeAgent exactly as ``edgewire edge run`` executes it -- folder source, decode,
preprocess, infer (micro-batched), judge, task state machine, and every LocalResult published
to a real broker (Mosquitto when installed, else the embedded amqtt broker in its own process).

bare: a hand-written loop over the same frame files and model: cv2.imread, the same
preprocessing, one ``InferenceSession.run`` per frame, nothing else.

Rounds alternate between the two so that machine noise hits both alike; the median of each
is reported. The last line is one JSON object.

    python bench/edge_pipeline.py [--rounds 5] [--frames 2160]
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
from pathlib import Path

import cv2
import numpy as np
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


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe:
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
        kind = "mosquitto"
    else:
        cmd = [sys.executable, "-m", "edgewire.cli", "broker", "--port", str(port)]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        kind = "amqtt"
    wait_port(port)
    return proc, port, kind


def bare_fps(model: Path, files: list[Path]) -> float:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = ModelMeta.model_validate_json(session.get_modelmeta().custom_metadata_map[META_KEY])
    spec = meta.input
    name = spec.name
    t0 = time.perf_counter()
    for path in files:
        # The same decode the device does for a gray model: straight to gray.
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        h, w = gray.shape
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        small = cv2.resize(
            gray[y0 : y0 + side, x0 : x0 + side], (spec.width, spec.height), interpolation=cv2.INTER_AREA
        )
        x = ((small.astype(np.float32) * spec.scale - spec.mean[0]) / spec.std[0])[None, None]
        session.run(None, {name: x})
    return len(files) / (time.perf_counter() - t0)


async def pipeline_fps(model: Path, frames_dir: Path, n: int, port: int, workers: int) -> tuple[float, int]:
    cfg = DeviceConfig(
        device_id="bench-01",
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{port}"),
        source=SourceSettings(kind="folder", path=frames_dir, loop=True, max_frames=n),
        model=ModelSettings(path=model),
        publish=PublishSettings(telemetry_interval_s=60),
        pipeline=PipelineSettings(workers=workers),
    )
    agent = EdgeAgent(cfg)
    summary = await agent.run()
    assert agent.session is not None
    return summary.completed / summary.busy_s, agent.session.published


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=2160, help="frames per pipeline round (loops the set)")
    parser.add_argument("--data", type=Path, default=None, help="reuse a demo folder")
    parser.add_argument("--workers", type=int, default=PipelineSettings().workers, help="pipeline worker threads")
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
            bare, piped, single = [], [], []
            bare_fps(arts.edge_model, files[:50])  # warm caches
            n = len(bare_files)
            for r in range(args.rounds):
                b = bare_fps(arts.edge_model, bare_files)
                p, published = asyncio.run(pipeline_fps(arts.edge_model, arts.frames_dir, n, port, args.workers))
                p1, _ = asyncio.run(pipeline_fps(arts.edge_model, arts.frames_dir, n, port, 1))
                bare.append(b)
                piped.append(p)
                single.append(p1)
                print(
                    f"round {r + 1}: bare {b:6.0f} fps   pipeline {p:6.0f} fps (ratio {p / b:4.2f}), "
                    f"1 worker {p1:6.0f} fps (ratio {p1 / b:4.2f})   {published} messages published"
                )
        finally:
            proc.terminate()
            proc.wait(10)
    result = {
        "pipeline_fps": round(statistics.median(piped), 1),
        "bare_fps": round(statistics.median(bare), 1),
        "ratio": round(statistics.median(p / b for p, b in zip(piped, bare, strict=True)), 3),
        "workers": args.workers,
        "pipeline_fps_1_worker": round(statistics.median(single), 1),
        "ratio_1_worker": round(statistics.median(p / b for p, b in zip(single, bare, strict=True)), 3),
        "frames_per_round": len(bare_files),
        "rounds": args.rounds,
        "broker": broker_kind,
        "target_ratio": 0.9,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
