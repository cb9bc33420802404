"""What a device says about its own work: telemetry every few seconds, and a run's summary.

Both are read off the device's meter, so what an operator sees on the telemetry topic and what
``edgewire edge run`` prints at the end are the same counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgewire import envelopes as env
from edgewire import topics
from edgewire.metrics import Meter
from edgewire.session import MqttSession

from .local_results import LocalRows
from .machine import Machine


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

    @classmethod
    def of(cls, meter: Meter, *, model: str, version: str, mode: str, elapsed_s: float, busy_s: float) -> AgentSummary:
        return cls(
            device_id=meter.client_id,
            model=model,
            version=version,
            mode=mode,
            frames=int(meter.total("frames_total")),
            completed=int(meter.total("frames_completed_total")),
            hard=int(meter.total("frames_hard_total")),
            escalated=int(meter.total("frames_escalated_total")),
            timeouts=int(meter.total("escalations_timed_out_total")),
            failed=int(meter.total("frames_failed_total")),
            rejected=int(meter.total("messages_rejected_total")),
            elapsed_s=elapsed_s,
            busy_s=busy_s,
            late=int(meter.total("late_results_total")),
        )


def observe_answered_here(meter: Meter, rows: LocalRows) -> None:
    """Latency of the frames a batch answered on the device (a frame waiting for the cloud is
    observed when its final outcome is made, as ``escalated``)."""
    if rows.counted is not None:  # counted on the worker: every row answered here
        meter.observe_counted("frame_latency_ms", rows.counted, path="local")
        return
    latencies = rows.completed_latencies()
    if latencies:
        meter.observe_many("frame_latency_ms", latencies, path="local")


async def report_every(session: MqttSession, meter: Meter, interval_s: Callable[[], float]) -> None:
    """Publish telemetry every ``interval_s()`` seconds (a setting that may change over the air),
    with the frame rate since the last report and what the machine is doing (edge.machine)."""
    started = time.monotonic()
    last_count, last_t = 0.0, started
    machine = await asyncio.to_thread(Machine)
    try:
        while True:
            await asyncio.sleep(interval_s())
            now = time.monotonic()
            count = meter.total("frames_completed_total")
            meter.set("pipeline_fps", (count - last_count) / max(now - last_t, 1e-9))
            last_count, last_t = count, now
            for name, value in (await asyncio.to_thread(machine.sample)).items():
                meter.set(name, value)
            await publish_telemetry(session, meter, now - started)
    finally:
        machine.close()


async def publish_telemetry(session: MqttSession, meter: Meter, elapsed: float) -> None:
    metrics = meter.snapshot()
    metrics["uptime_s"] = elapsed
    device_id = session.client_id
    payload = env.encode(env.Telemetry(client_id=device_id, ts=time.time(), metrics=metrics))
    await session.publish(topics.TELEMETRY.build(client_id=device_id), payload, qos=topics.TELEMETRY.qos)
