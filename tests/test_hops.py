"""Hop stamps to steps: ordered by the hop list, whatever order the map arrived in."""

from __future__ import annotations

import pytest

from edgewire import envelopes as env
from edgewire.fleet.trace import render, timeline
from edgewire.hops import HOPS, RELAY_HOPS, steps, total_ms


def test_steps_follow_the_hop_order_and_telescope() -> None:
    stamps = {name: 1000.0 + i * 0.004 for i, (name, _) in enumerate(HOPS)}
    shuffled = dict(reversed(list(stamps.items())))
    laid = steps(shuffled)
    assert [s.hop for s in laid] == [name for name, _ in HOPS[1:]]
    assert all(s.ms == pytest.approx(4.0) for s in laid)
    assert total_ms(shuffled) == pytest.approx((stamps["final"] - stamps["captured"]) * 1000)


def test_a_timeout_has_no_bridge_steps_and_unknown_stamps_are_ignored() -> None:
    laid = steps({"captured": 1.0, "judged": 1.002, "queued": 1.003, "sent": 1.004, "final": 3.0, "later": 9.0})
    assert [s.hop for s in laid] == ["judged", "queued", "sent", "final"]
    assert laid[-1].ms == pytest.approx(1996.0)


def test_timeline_and_its_text() -> None:
    direct = [name for name, _ in HOPS if name not in RELAY_HOPS]  # a device and one bridge
    stamps = {name: 50.0 + i * 0.002 for i, name in enumerate(direct)}
    result = env.LocalResult(
        trace_id="r-1", device_id="cam-1", seq=1, source_ref="f.jpg", ts=50.0, state="COMPLETE",
        answered_by="cloud", model="digits-cloud", version="1", degraded=False, latency_ms=18.0, hops=stamps,
    )  # fmt: skip
    t = timeline(result)
    assert t["steps_ms"] == pytest.approx(18.0) and t["steps"][-1]["at_ms"] == pytest.approx(18.0)
    text = render([t])
    assert "trace r-1 on cam-1" in text and "triton: inference" in text and "sum of steps" in text


def test_a_request_handed_up_by_a_site_has_the_site_stamps_around_the_cloud_bridges() -> None:
    at = {"sent": 1.0, "site_received": 1.1, "handed_up": 1.3, "bridge_received": 1.5, "dispatched": 1.6}
    at |= {"answered": 1.7, "bridge_sent": 1.8, "site_relayed": 2.0, "answer_received": 2.1}
    laid = steps(dict(sorted(at.items(), key=lambda kv: -kv[1])))
    assert [s.hop for s in laid] == list(at)[1:]
    assert {s.hop: s.what for s in laid}["handed_up"] == "site bridge: site model tried"
    assert total_ms(at) == pytest.approx(1100.0)
