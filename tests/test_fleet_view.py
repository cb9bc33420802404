"""The monitor's fold of fleet messages into rows, and its screen against its JSON."""

from __future__ import annotations

import io
import json

from rich.console import Console

from edgewire import envelopes as env
from edgewire import topics
from edgewire.cli.monitor import summary_line, table
from edgewire.fleet.fleet_view import FleetView, summary


def presence(cid: str, online: bool, *, kind: str = "device", state: str = "joint", ts: float = 100.0, **kw: object):
    p = env.Presence(client_id=cid, kind=kind, online=online, ts=ts, software="t", state=state, **kw)  # type: ignore[arg-type]
    return topics.PRESENCE.build(client_id=cid), env.encode(p)


def telemetry(cid: str, ts: float, **metrics: float):
    return topics.TELEMETRY.build(client_id=cid), env.encode(env.Telemetry(client_id=cid, ts=ts, metrics=metrics))


def status(device: str, version: str, state: str, progress: float = 0.0):
    s = env.ModelStatus(device_id=device, name="digits", version=version, state=state, progress=progress, ts=1.0)  # type: ignore[arg-type]
    return topics.MODEL_STATUS.build(device_id=device, model="digits"), env.encode(s)


def fleet() -> FleetView:
    view = FleetView()
    for cid, fl in (("cam-1", "north"), ("cam-2", "north"), ("cam-3", "south")):
        view.apply(*presence(cid, True, fleet=fl, models={"digits": "1.0"}), received=100.0)
    view.apply(*presence("bridge-1", True, kind="bridge"), received=100.0)
    view.apply(*presence("distributor-1", True, kind="distributor"), received=100.0)
    view.apply(
        *telemetry(
            "cam-1", 101.0, pipeline_fps=25.0, frames_completed_total=100, frames_escalated_total=10,
            **{"frame_latency_ms_p50{path=local}": 4.0, "frame_latency_ms_p99{path=local}": 9.5,
               "frame_latency_ms_p50{path=escalated}": 40.0, "frame_latency_ms_p99{path=escalated}": 95.0,
               "frames_failed_total{reason=decode}": 2, "messages_rejected_total{reason=payload}": 1},
            outbox_depth=3, frames_dropped_total=4, cpu_percent=37.0, memory_used_percent=52.0, temperature_c=48.0,
        ),
        received=101.0,
    )  # fmt: skip
    view.apply(
        *telemetry("cam-1", 102.0, pipeline_fps=30.0, frames_completed_total=200, frames_escalated_total=30),
        received=102.0,
    )
    view.apply(*status("cam-2", "2.0", "downloading", 0.4), received=102.0)
    return view


def test_rows_fold_presence_telemetry_and_statuses() -> None:
    view = fleet()
    rows = {r.client_id: r for r in view.rows()}
    cam1 = rows["cam-1"]
    assert cam1.fps == 30.0 and cam1.escalation_rate == 0.2  # 20 of the last 100 frames
    assert cam1.errors == 0.0  # no error counted in the last report: none, not unknown
    assert cam1.cpu_percent is None  # no reading in the last report: unknown, not zero
    assert rows["cam-2"].rollout == {"digits": "2.0 downloading 40%"}
    assert [r.client_id for r in view.rows()] == ["cam-1", "cam-2", "cam-3", "bridge-1", "distributor-1"]
    assert summary(view.rows())["rollouts"] == 1
    view.apply(*status("cam-2", "2.0", "active"), received=103.0)
    assert view.clients["cam-2"].models == {"digits": "2.0"}
    assert summary(view.rows())["rollouts"] == 0


def test_filters_sort_and_offline_since() -> None:
    view = fleet()
    view.apply(*presence("cam-3", False, ts=50.0), received=110.0)  # its will, seen live
    assert view.clients["cam-3"].state == "offline" and view.clients["cam-3"].offline_since == 110.0
    assert [r.client_id for r in view.rows(fleet="north")] == ["cam-1", "cam-2"]
    assert [r.client_id for r in view.rows(selector="cam-[23]")] == ["cam-2", "cam-3"]
    assert [r.client_id for r in view.rows(state="offline")] == ["cam-3"]
    assert [r.client_id for r in view.rows(sort="state")][:3] == ["cam-3", "cam-1", "cam-2"]
    assert next(r.client_id for r in view.rows(sort="fps")) == "cam-1"
    s = summary(view.rows())
    assert (s["devices"], s["online"], s["offline"], s["bridges"], s["fps"]) == (3, 2, 1, 1, 30.0)
    # A retained will read by a monitor that never saw the device: offline since it was last heard of.
    late = FleetView()
    late.apply(*presence("cam-9", False, ts=42.0), received=500.0)
    assert late.clients["cam-9"].offline_since == 42.0
    view.apply(*presence("cam-1", True, state="degraded"), received=111.0)
    assert view.clients["cam-1"].state == "degraded"


def test_malformed_and_foreign_messages_are_counted_not_folded() -> None:
    view = FleetView()
    assert not view.apply("presence/cam-1", b"\x00garbage", 1.0)
    assert not view.apply("not/a/topic/at/all", b"", 1.0)
    assert view.rejected == 2 and view.clients == {}


def test_screen_and_json_carry_the_same_figures() -> None:
    view = fleet()
    view.apply(
        *telemetry(
            "cam-1", 103.0, pipeline_fps=31.5, frames_completed_total=300, frames_escalated_total=40,
            **{"frame_latency_ms_p50{path=local}": 4.25, "frame_latency_ms_p99{path=local}": 9.5,
               "frame_latency_ms_p50{path=escalated}": 41.0, "frame_latency_ms_p99{path=escalated}": 96.0},
            outbox_depth=3, frames_dropped_total=4, cpu_percent=37.0, memory_used_percent=52.0, temperature_c=48.0,
        ),
        received=103.0,
    )  # fmt: skip
    rows = view.rows()
    screen = io.StringIO()
    Console(file=screen, width=250, color_system=None).print(table(rows, 104.0))
    lines = {line.split()[0]: line.split() for line in screen.getvalue().splitlines()[1:] if line.strip()}
    doc = json.loads(json.dumps([r.as_json(104.0) for r in rows]))
    cam1 = next(d for d in doc if d["client_id"] == "cam-1")
    cells = lines["cam-1"]
    assert cells[:6] == ["cam-1", "device", "online", "north", "digits@1.0", "-"]
    fps, esc, local, cloud, outbox, drops, errors, cpu, mem, temp = cells[6:]
    assert float(fps) == cam1["fps"] and float(esc) == round(100 * cam1["escalation_rate"])
    assert local == f"{cam1['p50_local_ms']:.1f}/{cam1['p99_local_ms']:.1f}"
    assert cloud == f"{cam1['p50_escalated_ms']:.0f}/{cam1['p99_escalated_ms']:.0f}"
    assert [float(outbox), float(drops), float(cpu), float(mem)] == [
        cam1["outbox"],
        cam1["drops"],
        cam1["cpu_percent"],
        cam1["memory_percent"],
    ]
    assert float(errors) == cam1["errors"] == 0.0 and temp == "48C"
    assert summary_line(rows).startswith("fleet: 3 devices, 3 online, 0 degraded, 0 offline; 31.5 frames/s")


def test_results_are_counted_and_bring_a_device_back() -> None:
    view = fleet()
    view.apply(*presence("cam-3", False), received=110.0)
    row = env.LocalResult(
        trace_id="t", device_id="cam-3", seq=1, source_ref="f", ts=111.0, state="COMPLETE", answered_by="edge",
        model="digits", version="1.0", degraded=False, latency_ms=3.0,
    )  # fmt: skip
    payload = env.encode(env.LocalResults(device_id="cam-3", results=[row, row]))
    assert view.apply(topics.LOCAL.build(device_id="cam-3"), payload, 112.0)
    assert view.clients["cam-3"].results_seen == 2 and view.clients["cam-3"].state == "online"
    assert not view.apply(topics.LOCAL.build(device_id="cam-2"), payload, 112.0)  # another device's results
    assert not view.apply(topics.LOCAL.build(device_id="cam-3"), b"\xc1", 112.0)
    assert view.rejected == 2
