"""The escalation lifecycle against a real broker and an answering peer on the wire (no Triton):
answers merged by the one merge rule, duplicates dropped, deadlines ending a frame exactly once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest
import yaml

from edgewire import envelopes as env
from edgewire import topics
from edgewire.config import (
    BrokerSettings,
    CloudSettings,
    DeviceConfig,
    JudgeSettings,
    ModelSettings,
    OutboxSettings,
    SourceSettings,
)
from edgewire.demo.models import LABELS, DemoArtifacts
from edgewire.edge.agent import EdgeAgent
from edgewire.edge.merge import final_outcome

from .conftest import Mosquitto, until
from .test_edge_integration import spawn_edge_run

FRAMES = 24
LOCAL = env.Prediction(label="3", class_index=3, confidence=0.6, margin=0.1)


def _config(demo: DemoArtifacts, port: int, **cloud: object) -> DeviceConfig:
    return DeviceConfig(
        device_id="cam-e",
        broker=BrokerSettings(url=f"mqtt://127.0.0.1:{port}", startup_wait_s=5),
        source=SourceSettings(kind="folder", path=demo.frames_dir, fps=200, max_frames=FRAMES),
        model=ModelSettings(path=demo.edge_model),
        judge=JudgeSettings(unknown_labels=list(LABELS)),  # every frame is hard
        cloud=CloudSettings(**cloud),  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def answering_peer(port: int, answer: Callable[[env.Request], list[env.Result]]) -> AsyncIterator[list[str]]:
    """A plain MQTT client standing where the bridge would: answers each request as told."""
    seen: list[str] = []
    ready = asyncio.Event()

    async def serve() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"peer-{os.getpid()}") as client:
            await client.subscribe(topics.REQUEST.filter(), qos=1)
            ready.set()
            async for message in client.messages:
                request = env.decode(env.Request, bytes(message.payload))
                seen.append(request.trace_id)
                for result in answer(request):
                    await client.publish(request.reply_to, env.encode(result), qos=1)

    task = asyncio.create_task(serve())
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _result(request: env.Request, status: str = "ok", confidence: float = 0.99) -> env.Result:
    prediction = env.Prediction(label="7", class_index=7, confidence=confidence, margin=0.5)
    return env.Result(
        trace_id=request.trace_id,
        device_id=request.device_id,
        bridge_id="peer",
        status=status,  # type: ignore[arg-type]
        model="digits-cloud",
        version="9",
        prediction=prediction if status == "ok" else None,
        timings=env.Timings(queued_ms=0.0, inference_ms=1.0, total_ms=1.0),
    )


@pytest.fixture
def mqtt_port(tmp_path: Path) -> int:
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker.port  # type: ignore[misc]
    broker.stop()


def _finals(results: list[env.LocalResult]) -> dict[str, list[env.LocalResult]]:
    by_trace: dict[str, list[env.LocalResult]] = {}
    for r in results:
        if r.state != "PENDING_CLOUD":
            by_trace.setdefault(r.trace_id, []).append(r)
    return by_trace


async def test_answers_replace_local_ones_once_and_duplicates_are_dropped(demo: DemoArtifacts, mqtt_port: int) -> None:
    results: list[env.LocalResult] = []
    async with answering_peer(mqtt_port, lambda req: [_result(req), _result(req)]) as seen:
        agent = EdgeAgent(_config(demo, mqtt_port, deadline_ms=10_000), on_result=results.append)
        summary = await agent.run()
    finals = _finals(results)
    escalated = [r.trace_id for r in results if r.state == "PENDING_CLOUD"]
    assert escalated and set(escalated) <= set(seen)
    assert all(len(finals[t]) == 1 for t in escalated)  # one outcome each, duplicates or not
    assert all(finals[t][0].answered_by == "cloud" and finals[t][0].prediction.label == "7" for t in escalated)
    assert all(finals[t][0].model == "digits-cloud" and not finals[t][0].late for t in escalated)
    assert summary.completed == FRAMES and summary.timeouts == 0
    assert agent.meter.get("results_ignored_total", reason="duplicate_or_late") >= 1


async def test_max_confidence_keeps_the_surer_local_answer(demo: DemoArtifacts, mqtt_port: int) -> None:
    results: list[env.LocalResult] = []
    async with answering_peer(mqtt_port, lambda req: [_result(req, confidence=0.0)]):
        agent = EdgeAgent(
            _config(demo, mqtt_port, deadline_ms=10_000, merge="max_confidence"), on_result=results.append
        )
        await agent.run()
    finals = [r for rs in _finals(results).values() for r in rs]
    assert finals and all(r.state == "COMPLETE" for r in finals)
    waited = {r.trace_id for r in results if r.state == "PENDING_CLOUD"}
    assert all(r.answered_by == "edge" and not r.degraded for r in finals if r.trace_id in waited)


async def test_unanswered_escalations_time_out_once_and_degrade_the_device(demo: DemoArtifacts, mqtt_port: int) -> None:
    results: list[env.LocalResult] = []
    async with answering_peer(mqtt_port, lambda req: []):
        agent = EdgeAgent(
            _config(demo, mqtt_port, deadline_ms=300, degraded_after=2, offline_deadline_s=0), on_result=results.append
        )
        summary = await agent.run()
    waited = [r.trace_id for r in results if r.state == "PENDING_CLOUD"]
    finals = _finals(results)
    assert waited and all([f.state for f in finals[t]] == ["TIMEOUT"] for t in waited)
    assert all(f.degraded and f.answered_by == "edge" for t in waited for f in finals[t])
    assert summary.timeouts == len(waited) and summary.completed == FRAMES
    assert summary.mode == "degraded"  # two timeouts in a row were enough
    assert agent.meter.get("mode_transitions_total", to="degraded", reason="timeout") == 1


def _first(state: str = "PENDING_CLOUD") -> env.LocalResult:
    return env.LocalResult(
        trace_id="t",
        device_id="cam",
        seq=0,
        source_ref="f",
        ts=time.time() - 1,
        state=state,  # type: ignore[arg-type]
        answered_by="edge",
        prediction=LOCAL,
        model="edge",
        version="1",
        degraded=False,
        latency_ms=1.0,
    )


def _answer(status: str, confidence: float = 0.9) -> env.Result:
    request = env.Request(
        trace_id="t",
        device_id="cam",
        fleet="f",
        created=0.0,
        deadline=1.0,
        local=LOCAL,
        payload=b"",
        content_type="image/png",
        reply_to="result/cam",
    )
    return _result(request, status, confidence)


@pytest.mark.parametrize(
    ("merge", "confidence", "by"),
    [("prefer_cloud", 0.1, "cloud"), ("max_confidence", 0.9, "cloud"), ("max_confidence", 0.1, "edge")],
)
def test_the_merge_rule(merge: str, confidence: float, by: str) -> None:
    cloud = CloudSettings(merge=merge)  # type: ignore[arg-type]
    final = final_outcome(cloud, _first(), _answer("ok", confidence), late=False)
    assert final is not None and final.state == "COMPLETE" and final.answered_by == by and not final.degraded
    assert final.model == ("digits-cloud" if by == "cloud" else "edge") and final.latency_ms >= 1000


def test_outcomes_without_a_usable_answer() -> None:
    cloud = CloudSettings()
    timed_out = final_outcome(cloud, _first(), None, late=True)
    assert timed_out is not None and timed_out.state == "TIMEOUT" and timed_out.degraded and timed_out.late
    unavailable = final_outcome(cloud, _first(), _answer("unavailable"), late=False)
    assert unavailable is not None and unavailable.state == "COMPLETE" and unavailable.degraded
    # A frame answered already (queued while degraded): a failure or a deadline adds nothing ...
    assert final_outcome(cloud, _first("COMPLETE"), None, late=True) is None
    assert final_outcome(cloud, _first("COMPLETE"), _answer("unavailable"), late=True) is None
    # ... and a late cloud answer is its second, late outcome.
    late = final_outcome(cloud, _first("COMPLETE"), _answer("ok"), late=True)
    assert late is not None and late.answered_by == "cloud" and late.late


@pytest.mark.parametrize("case", ["answered", "overdue"])
async def test_a_restart_finishes_once_what_a_kill_left_owed(
    demo: DemoArtifacts, mqtt_port: int, tmp_path: Path, case: str
) -> None:
    """Answered late if the cloud answers after the restart; recorded TIMEOUT (late) by the
    overdue sweep if the deadline passed while the device was down. Exactly one outcome each."""
    db = tmp_path / "cam-e.db"
    deadline_ms = 60_000 if case == "answered" else 1_000
    cfg = _config(demo, mqtt_port, deadline_ms=deadline_ms, outbox=OutboxSettings(path=db))
    looping = cfg.model_copy(update={"source": SourceSettings(kind="folder", path=demo.frames_dir, fps=40, loop=True)})
    log = (tmp_path / "device.log").open("wb")
    device = await spawn_edge_run(looping, tmp_path, output=log.fileno())
    assert await until(lambda: _owed(db) >= 10, 60)
    device.send_signal(signal.SIGKILL)  # no goodbye, escalations in flight
    await device.wait()
    owed = _owed_keys(db)
    # An outcome the kill caught decided but not yet published goes out on the restart as it was.
    stored = _stored_outcomes(db)
    if case == "overdue":
        await asyncio.sleep(deadline_ms / 1000 + 0.5)

    results: list[env.LocalResult] = []
    answer = (lambda req: [_result(req)]) if case == "answered" else (lambda req: [])
    restart = cfg.model_copy(update={"source": SourceSettings(kind="mqtt")})
    async with answering_peer(mqtt_port, answer):
        agent = EdgeAgent(restart, on_result=results.append)
        run = asyncio.create_task(agent.run())
        try:
            assert await until(lambda: {r.trace_id for r in results} >= owed, 30)
            await asyncio.sleep(1.5)  # room for a second outcome to show up
        finally:
            agent.stop()
            await asyncio.wait_for(run, 20)
    per_trace = collections.Counter(r.trace_id for r in results)
    assert set(per_trace) == owed | set(stored) and set(per_trace.values()) == {1}
    assert all(r == stored[r.trace_id] for r in results if r.trace_id in stored)
    results = [r for r in results if r.trace_id in owed]
    assert all(r.late for r in results)
    if case == "answered":
        assert all(r.state == "COMPLETE" and r.answered_by == "cloud" and not r.degraded for r in results)
        assert agent.meter.get("late_results_total", status="ok") == len(owed)
    else:
        assert all(r.state == "TIMEOUT" and r.degraded for r in results)
        assert agent.meter.get("escalations_timed_out_total") == len(owed)
    assert _owed(db) == 0


def _owed_keys(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {row[0] for row in con.execute("SELECT key FROM owed WHERE state = 'waiting'")}
    except sqlite3.OperationalError:  # the device has not created its tables yet
        return set()
    finally:
        con.close()


def _stored_outcomes(db: Path) -> dict[str, env.LocalResult]:
    """Outcomes decided and stored with their flip, not yet known to be published."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT key, outcome FROM owed WHERE outcome IS NOT NULL").fetchall()
    return {key: env.decode(env.LocalResults, doc).results[0] for key, doc in rows}


def _owed(db: Path) -> int:
    return len(_owed_keys(db))


async def test_degraded_without_answers_and_back_when_they_come(demo: DemoArtifacts, mqtt_port: int) -> None:
    """Timeouts degrade the device; hard frames are still queued, and once a peer answers they
    come back late (answered by the cloud) and the device is joint again. One final per frame."""
    results: list[env.LocalResult] = []
    # A deadline with room: once the peer answers, a loaded machine must not time out again.
    cfg = _config(demo, mqtt_port, deadline_ms=2000, degraded_after=2)
    cfg = cfg.model_copy(update={"source": SourceSettings(kind="folder", path=demo.frames_dir, fps=20, loop=True)})
    agent = EdgeAgent(cfg, on_result=results.append)
    run = asyncio.create_task(agent.run())
    try:
        assert await until(lambda: agent.mode == "degraded", 20)
        async with answering_peer(mqtt_port, lambda req: [_result(req)]):
            assert await until(lambda: agent.mode == "joint", 30)
            await asyncio.sleep(1.0)
            agent.stop()
            await asyncio.wait_for(run, 30)
    finally:
        agent.stop()
        await asyncio.gather(run, return_exceptions=True)
    # At least once (a trial after the cool-off may time out once more before the peer's first
    # answer lands on a loaded machine), and back to joint because the cloud answered.
    assert agent.meter.get("mode_transitions_total", to="degraded", reason="timeout") >= 1
    assert agent.meter.get("mode_transitions_total", to="joint", reason="cloud_answered") >= 1
    late = [r for r in results if r.late]
    assert late and all(r.answered_by == "cloud" for r in late)  # queued while degraded, answered later
    finals = [r for r in results if r.state != "PENDING_CLOUD" and not r.late]
    assert len({r.trace_id for r in finals}) == len(finals)
    waited = {r.trace_id for r in results if r.state == "PENDING_CLOUD"}
    assert waited <= {r.trace_id for r in finals}  # every frame that waited has its outcome


@pytest.mark.parametrize("refusal", ["unavailable", "rate limited"])
async def test_a_not_now_answer_to_a_queued_request_is_asked_again_not_taken(
    demo: DemoArtifacts, mqtt_port: int, refusal: str
) -> None:
    """Queued while degraded, a request has minutes to go: the cloud answering ``unavailable``
    (its models down for a moment), or ``rejected: rate limited`` (the device past its budget
    at the bridge), must cost it a delay, not its answer. The peer answers every request's
    first send so and its resend ``ok``: each queued frame still ends with the cloud's answer,
    once, and the device counts the retries."""
    results: list[env.LocalResult] = []
    sends: collections.Counter[str] = collections.Counter()

    def first_refused(req: env.Request) -> list[env.Result]:
        sends[req.trace_id] += 1
        if sends[req.trace_id] > 1:
            return [_result(req, "ok")]
        if refusal == "unavailable":
            return [_result(req, "unavailable")]
        return [_result(req, "rejected").model_copy(update={"reason": "rate limited"})]

    cfg = _config(demo, mqtt_port, deadline_ms=300, degraded_after=1, outbox=OutboxSettings(resend_after_s=0.5))
    frames = 40  # at 20 a second: the first few time out, the rest are answered here and queued
    cfg = cfg.model_copy(update={"source": SourceSettings(kind="folder", path=demo.frames_dir, fps=20, loop=True)})
    agent = EdgeAgent(cfg, on_result=results.append)
    run = asyncio.create_task(agent.run())
    try:
        # No one answers: the first frames time out, the device degrades and queues the rest.
        done = lambda: agent.meter.total("frames_completed_total") >= frames  # noqa: E731
        assert await until(lambda: agent.mode == "degraded" and done(), 30)
        async with answering_peer(mqtt_port, first_refused):
            late = lambda: [r for r in results if r.late and r.answered_by == "cloud"]  # noqa: E731
            queued = {r.trace_id for r in results if r.state == "COMPLETE" and r.degraded and not r.late}
            assert await until(lambda: {r.trace_id for r in late()} >= queued, 60), (len(late()), len(queued))
            await asyncio.sleep(1.0)
    finally:
        agent.stop()
        await asyncio.gather(run, return_exceptions=True)
    assert queued, "no frame was queued while degraded"
    assert all(sends[t] >= 2 for t in queued)  # each was refused once and asked again
    counted = "unavailable" if refusal == "unavailable" else "rate_limited"
    assert agent.meter.get("results_retried_total", status=counted) >= len(queued)
    late_by_trace = collections.Counter(r.trace_id for r in results if r.late)
    assert all(n == 1 for n in late_by_trace.values()), late_by_trace.most_common(3)
    assert all(r.answered_by == "cloud" for r in results if r.late)


# The device with a consumer of its outcomes that dies at the first cloud-answered one: the
# answer's flip is committed, the outcome decided and stored, and nothing has published it.
DIES_AT_FIRST_ANSWER = r"""
import asyncio, json, os, sys
from edgewire.config import load_device_config
from edgewire.edge.agent import EdgeAgent

config, out_path = sys.argv[1], sys.argv[2]
out = open(out_path, "a", buffering=1)


def hook(result):
    if result.state != "PENDING_CLOUD" and result.answered_by == "cloud":
        out.write(json.dumps({"died_at": result.trace_id}) + "\n")
        os._exit(9)  # as kill -9: no cleanup, no flush of anything else
    out.write(json.dumps({"r": result.model_dump(mode="json")}) + "\n")


asyncio.run(EdgeAgent(load_device_config(config), on_result=hook).run())
"""


async def test_an_outcome_decided_just_before_a_crash_is_published_by_the_next_start(
    demo: DemoArtifacts, mqtt_port: int, tmp_path: Path
) -> None:
    """The flip of an answer's owed row stores the outcome it decided: a device that dies
    between that commit and publishing the outcome publishes it on its next start, the same
    outcome, once; nothing is left owed or stored."""
    db = tmp_path / "cam-e.db"
    cfg = _config(demo, mqtt_port, deadline_ms=60_000, outbox=OutboxSettings(path=db))
    (tmp_path / "device.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (tmp_path / "driver.py").write_text(DIES_AT_FIRST_ANSWER)
    out = tmp_path / "outcomes.jsonl"
    async with answering_peer(mqtt_port, lambda req: [_result(req)]):
        device = await asyncio.create_subprocess_exec(
            sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "device.yaml"), str(out)
        )
        assert await asyncio.wait_for(device.wait(), 60) == 9
    died_at = json.loads(out.read_text().splitlines()[-1])["died_at"]
    stored = _stored_outcomes(db)
    assert died_at in stored and stored[died_at].answered_by == "cloud" and not stored[died_at].late

    results: list[env.LocalResult] = []
    restart = cfg.model_copy(update={"source": SourceSettings(kind="mqtt")})
    async with answering_peer(mqtt_port, lambda req: [_result(req)]):
        agent = EdgeAgent(restart, on_result=results.append)
        run = asyncio.create_task(agent.run())
        try:
            assert await until(lambda: _owed(db) == 0 and set(stored) <= {r.trace_id for r in results}, 30)
            await asyncio.sleep(1.5)  # room for a second outcome to show up
        finally:
            agent.stop()
            await asyncio.wait_for(run, 20)
    per_trace = collections.Counter(r.trace_id for r in results)
    assert max(per_trace.values()) == 1, per_trace
    by_trace = {r.trace_id: r for r in results}
    assert all(by_trace[key] == outcome for key, outcome in stored.items())
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT COUNT(*) FROM owed WHERE outcome IS NOT NULL").fetchone()[0] == 0
