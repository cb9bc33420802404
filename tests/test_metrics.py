"""A batch of latencies observed at once counts exactly as the same latencies observed one by one."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from edgewire.metrics import LATENCY_BUCKETS_MS, Meter


def prometheus_samples(client: str) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for family in REGISTRY.collect()
        if family.name == "edgewire_frame_latency_ms"
        for s in family.samples
        if s.labels.get("client") == client and not s.name.endswith("_created")
    }


def test_observe_many_equals_observing_each() -> None:
    # Every bucket's edges, inside, beyond the last bound, and repeats.
    values = [0.0, 0.5, 0.6, *LATENCY_BUCKETS_MS, 3.3, 3.3, 3.3, 45_000.0, 12.0]
    one, many = Meter("obs-one"), Meter("obs-many")
    for v in values:
        one.observe("frame_latency_ms", v, path="local")
    many.observe_many("frame_latency_ms", values[:7], path="local")
    many.observe_many("frame_latency_ms", values[7:-5], path="local")
    many.observe_many("frame_latency_ms", values[-5:-2], path="local")  # all in one bucket
    many.observe_many("frame_latency_ms", values[-2:], path="local")

    def mine(meter: Meter) -> dict[str, float]:
        return {k.replace(meter.client_id, ""): v for k, v in meter.snapshot().items()}

    assert mine(many) == pytest.approx(mine(one))  # sums added in another order
    assert many.snapshot()["frame_latency_ms_count{path=local}"] == len(values)
    expected = prometheus_samples("obs-one")
    assert expected and prometheus_samples("obs-many") == pytest.approx(expected)
