"""Time to deliver one model artefact end to end over MQTT, against an HTTP download, in one run.

mqtt: `edgewire model push` (its own process) -> broker -> `edgewire edge run` (its own process,
      a device with delivery configured): chunks streamed to disk, then the whole file checked
      against its sha256 and Ed25519 signature. Timed from the first message of the push seen
      on the broker (the retained announce) to the device's `validating` status, which it
      publishes once the artefact is verified. Run once on Mosquitto, once on the embedded
      amqtt broker.
http: the same file from a local HTTP server (its own process), downloaded in 1 MiB reads,
      written to disk and hashed as it streams, then the signature checked: the same work a
      device does, without MQTT.

BENCH_TRACE=1 prints each status the device reports with its time since the announce.

The artefact is random bytes (it verifies, then fails validation as a model: that is after the
clock stops). Python start-up of the two processes is outside the timing. The last line is one
JSON object.

    python bench/delivery.py [--mib 64] [--chunk-kib 512]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from edgewire import envelopes as env
from edgewire import signing, topics
from edgewire.demo.models import build_demo
from edgewire.ports import free_port, wait_port
from edgewire.session import MqttSession

NAME = "digits-edge"
CLI = [sys.executable, "-m", "edgewire.cli"]


def start_mosquitto(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def start_amqtt() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([*CLI, "broker", "--allow-anonymous", "--port", str(port)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def mqtt_delivery(
    work: Path, port: int, artefact: Path, key: Path, public: Path, edge_model: Path, tag: str, chunk: int
) -> float:
    device_id = f"bench-{tag}"
    version = f"9.0.{tag}"
    cfg = {
        "device_id": device_id,
        "broker": {"url": f"mqtt://127.0.0.1:{port}"},
        "source": {"kind": "mqtt"},
        "model": {"path": str(edge_model)},
        "delivery": {"store": str(work / f"store-{tag}"), "public_key": str(public)},
    }
    (work / f"device-{tag}.yaml").write_text(yaml.safe_dump(cfg))
    device = subprocess.Popen(
        [*CLI, "edge", "run", "--config", str(work / f"device-{tag}.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with MqttSession(f"bench-watch-{tag}", "127.0.0.1", port) as watch:
            await watch.subscribe(topics.PRESENCE.build(client_id=device_id), qos=1)
            await watch.subscribe(topics.MODEL_STATUS.build(device_id=device_id, model=NAME), qos=1)
            await watch.subscribe(topics.MODEL_ANNOUNCE.build(model=NAME), qos=1)
            await watch.wait_connected(10)
            messages = watch.messages()
            while True:  # the device is up and subscribed
                msg = await asyncio.wait_for(anext(messages), 60)
                if (
                    topics.parse(str(msg.topic)).spec is topics.PRESENCE
                    and env.decode(env.Presence, msg.payload).online
                ):
                    break
            await asyncio.sleep(0.5)
            pusher = subprocess.Popen(
                [
                    *CLI,
                    "model",
                    "push",
                    str(artefact),
                    "--name",
                    NAME,
                    "--version",
                    version,
                    "--key",
                    str(key),
                    "--chunk-size",
                    str(chunk),
                    "--broker",
                    f"mqtt://127.0.0.1:{port}",
                    "--no-distributor",
                    "--history",
                    str(work / "history"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            t0 = None
            try:
                while True:
                    msg = await asyncio.wait_for(anext(messages), 300)
                    spec = topics.parse(str(msg.topic)).spec
                    if spec is topics.MODEL_ANNOUNCE and msg.payload and t0 is None:
                        if env.decode(env.Manifest, msg.payload).version == version:
                            t0 = time.perf_counter()
                    elif spec is topics.MODEL_STATUS and msg.payload:
                        status = env.decode(env.ModelStatus, msg.payload)
                        if status.version != version:
                            continue
                        if os.environ.get("BENCH_TRACE") and t0 is not None:
                            at = round(time.perf_counter() - t0, 3)
                            print(status.state, round(status.progress, 3), at, file=sys.stderr)
                        if status.state == "validating" and t0 is not None:
                            return time.perf_counter() - t0
                        if status.state == "failed" and t0 is not None:
                            raise RuntimeError(f"delivery failed before verification: {status.reason}")
            finally:
                pusher.wait(120)
    finally:
        stop(device)


def http_delivery(work: Path, artefact: Path, public: Path, signature: bytes) -> float:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(artefact.parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        key = signing.load_public(public.read_text())
        t0 = time.perf_counter()
        digest = hashlib.sha256()
        with (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/{artefact.name}") as response,
            open(work / "http-download", "wb") as out,
        ):
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
            out.flush()
            os.fsync(out.fileno())
        signing.verify(key, digest.digest(), signature)
        return time.perf_counter() - t0
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--chunk-kib", type=int, default=512, help="512 KiB is what `edgewire model push` uses")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = build_demo(work / "demo")
        pem, public = signing.generate()
        (work / "fleet.key").write_bytes(pem)
        (work / "fleet.pub").write_text(public)
        (work / "art").mkdir()
        artefact = work / "art" / "model.onnx"
        artefact.write_bytes(os.urandom(args.mib << 20))
        signature = signing.sign(signing.load_private(pem), hashlib.sha256(artefact.read_bytes()).digest())
        size_mib = args.mib
        chunk = args.chunk_kib * 1024
        http_s = http_delivery(work, artefact, work / "fleet.pub", signature)
        seconds: dict[str, float] = {}
        for tag, (name, start) in enumerate((("mosquitto", lambda: start_mosquitto(work)), ("amqtt", start_amqtt)), 1):
            broker, port = start()
            try:
                seconds[name] = asyncio.run(
                    mqtt_delivery(
                        work, port, artefact, work / "fleet.key", work / "fleet.pub", demo.edge_model, str(tag), chunk
                    )
                )
            finally:
                stop(broker)
        mosq_s, amqtt_s = seconds["mosquitto"], seconds["amqtt"]
        http_again = http_delivery(work, artefact, work / "fleet.pub", signature)
    http_best = min(http_s, http_again)
    print(
        json.dumps(
            {
                "artefact_mib": size_mib,
                "chunk_kib": args.chunk_kib,
                "mosquitto_s": round(mosq_s, 3),
                "amqtt_s": round(amqtt_s, 3),
                "http_s": round(http_best, 3),
                "mosquitto_mib_s": round(size_mib / mosq_s, 1),
                "amqtt_mib_s": round(size_mib / amqtt_s, 1),
                "http_mib_s": round(size_mib / http_best, 1),
                "ratio_mosquitto_http": round(http_best / mosq_s, 3),
                "ratio_amqtt_http": round(http_best / amqtt_s, 3),
                "targets": {"ratio_mosquitto_http": 0.5},
            }
        )
    )


if __name__ == "__main__":
    main()
