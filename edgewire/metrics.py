"""Numbers a component reports: kept once, exposed as Prometheus metrics and on telemetry topics.

Several components can live in one process (the demo runs a broker, a bridge and N devices),
so every metric carries a ``client`` label instead of relying on one registry per process.

Latencies are histograms in milliseconds (buckets from 0.5 ms to 30 s). On telemetry a histogram
travels as ``<name>_count``, ``<name>_sum`` and ``<name>_p50``/``_p99`` (from its buckets, as
Prometheus' ``histogram_quantile`` would estimate them), so a monitor that reads only MQTT shows
the same figures a dashboard does.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_FAMILIES: dict[str, Counter | Gauge | Histogram] = {}
#: Upper bounds (ms) of the latency buckets: a local answer takes a few ms, an escalation tens to
#: hundreds, a timeout seconds.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000,
)  # fmt: skip
_LOCK = threading.Lock()

DOCS = {
    "frames_total": "Frames taken from the source",
    "frames_completed_total": "Frames whose task reached a terminal state",
    "frames_hard_total": "Frames the judge found hard (candidates for the cloud)",
    "frames_escalated_total": "Frames sent to the cloud",
    "escalations_pending": "Escalated frames waiting for the cloud's answer",
    "escalations_timed_out_total": "Escalated frames whose deadline passed first (answered locally)",
    "escalations_skipped_total": "Hard frames answered locally without asking the cloud",
    "bytes_escalated_total": "Bytes of escalation requests sent up",
    "results_total": "Cloud answers taken, by status",
    "results_ignored_total": "Cloud answers for no waiting frame (late, duplicate or foreign)",
    "requests_total": "Escalation requests answered by the bridge, by status",
    "requests_failed_total": "Requests answered with something other than ok, by status",
    "requests_rejected_total": "Messages the bridge could not even answer (bad topic)",
    "requests_duplicate_total": "Redelivered requests not run again",
    "requests_inflight": "Requests being served",
    "requests_handed_up_total": "Requests a site's bridge handed up to the cloud, by why (unsure, busy, down, routed)",
    "upstream_answers_unmatched_total": "Cloud answers come down to a site's bridge for nothing waiting",
    "upstream_answers_rejected_total": "Messages under a site's uplink prefix that are no answer",
    "upstream_answers_missed_total": "Requests handed up whose cloud answer did not come in time",
    "results_unsent_total": "Results the bridge could not publish",
    "triton_calls_total": "Successful Triton inferences, by model",
    "triton_errors_total": "Failed Triton inferences, by model",
    "triton_model_ready": "1 when Triton reports the model ready on the endpoint",
    "breaker_state": "Circuit breaker per endpoint and model: 0 closed, 1 half-open, 2 open",
    "config_updates_total": "Desired configurations received, by outcome",
    "frames_dropped_total": "Frames dropped before inference (input backlog)",
    "frames_failed_total": "Frames that could not be decoded or inferred",
    "messages_rejected_total": "Received messages refused (bad topic, payload, version, size)",
    "publish_dropped_total": "QoS 0 messages dropped because the broker was not connected",
    "mqtt_reconnects_total": "Connections made to the broker after the first",
    "mqtt_connected": "1 while connected to the broker",
    "pipeline_fps": "Frames per second over the last telemetry interval",
    "queue_depth": "Frames waiting between the source and the engine",
    "frame_latency_ms": "Capture to final answer on the device, by path (local or escalated)",
    "bridge_step_ms": "Time a request spent in each bridge step (queued, decode, triton, total)",
    "triton_latency_ms": "Triton inference time as the bridge measured it, by model",
    "cpu_percent": "CPU busy over the last telemetry interval, all cores",
    "memory_used_percent": "Memory in use (total less available)",
    "disk_used_percent": "Disk in use on the device's data filesystem",
    "temperature_c": "Hottest thermal zone",
    "gpu_load_percent": "GPU load (Jetson, from tegrastats)",
    "power_mw": "Board input power (Jetson, from tegrastats)",
    "emc_load_percent": "Memory controller load (Jetson, from tegrastats)",
}


class _Histogram(Histogram):
    """A Prometheus histogram that also takes a batch of observations already counted per bucket."""

    def observe_counts(self, counts: dict[int, int], total: float) -> None:
        """``counts[i]`` more observations in bucket ``i`` (the buckets' order, +Inf last), summing
        to ``total``: a device's batch of frames at once instead of one lock and bucket scan
        per frame."""
        self._raise_if_not_observable()
        self._sum.inc(total)
        buckets = self._buckets
        for i, count in counts.items():
            buckets[i].inc(count)


def _family(name: str, kind: type[Any], labels: tuple[str, ...]) -> Any:
    key = f"edgewire_{name.removesuffix('_total')}" if kind is Counter else f"edgewire_{name}"
    with _LOCK:
        fam = _FAMILIES.get(key)
        if fam is None:
            if kind is Histogram:
                fam = _Histogram(key, DOCS.get(name, name), ("client", *labels), buckets=LATENCY_BUCKETS_MS)
            else:
                fam = kind(key, DOCS.get(name, name), ("client", *labels))
            _FAMILIES[key] = fam
        return fam


#: Latencies counted per bucket (by index, +Inf last) and their sum.
Counted = tuple[dict[int, int], float]


def count_latencies(values_ms: Sequence[float]) -> Counted:
    """How many of ``values_ms`` fall in each latency bucket, and their sum: a batch of frames
    is counted where its answers are made (a worker thread), and the event loop only adds the
    counts (:meth:`Meter.observe_counted`)."""
    if not values_ms:
        return {}, 0.0
    bounds, where = LATENCY_BUCKETS_MS, bisect.bisect_left
    low = where(bounds, min(values_ms))
    if low == where(bounds, max(values_ms)):  # a batch's frames mostly share one bucket
        return {low: len(values_ms)}, sum(values_ms)
    added: dict[int, int] = {}
    get = added.get
    for value in values_ms:
        i = where(bounds, value)
        added[i] = get(i, 0) + 1
    return added, sum(values_ms)


class _Buckets:
    """A histogram's own copy of its counts, for telemetry (the Prometheus child keeps its own)."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.sum = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_MS, value)] += 1
        self.sum += value
        self.count += 1

    def add_counted(self, counted: Counted) -> None:
        added, total = counted
        counts = self.counts
        for i, count in added.items():
            counts[i] += count
            self.count += count
        self.sum += total

    def quantile(self, q: float) -> float | None:
        """Prometheus' ``histogram_quantile``: linear within the bucket the rank falls in."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if seen + n >= rank and n > 0:
                lower = LATENCY_BUCKETS_MS[i - 1] if i > 0 else 0.0
                if i >= len(LATENCY_BUCKETS_MS):
                    return LATENCY_BUCKETS_MS[-1]
                return lower + (LATENCY_BUCKETS_MS[i] - lower) * (rank - seen) / n
            seen += n
        return LATENCY_BUCKETS_MS[-1]


class Meter:
    """One component's numbers; cheap enough to call once per frame."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self._values: dict[str, float] = {}
        # (name, kind, label items) -> (snapshot key, Prometheus child): a hot counter costs one
        # dict lookup, not a key built, a family looked up under a lock and a child resolved.
        self._slots: dict[tuple[Any, ...], tuple[str, Any]] = {}
        self._histograms: dict[str, tuple[str, dict[str, str], _Buckets]] = {}
        self._hslots: dict[tuple[Any, ...], tuple[_Buckets, Any]] = {}

    def _slot(self, name: str, kind: type[Counter] | type[Gauge], labels: dict[str, str]) -> tuple[str, Any]:
        ident = (name, kind, *labels.items())
        slot = self._slots.get(ident)
        if slot is None:
            child = _family(name, kind, tuple(sorted(labels))).labels(self.client_id, *_ordered(labels))
            slot = self._slots[ident] = (_key(name, labels), child)
        return slot

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key, child = self._slot(name, Counter, labels)
        self._values[key] = self._values.get(key, 0.0) + amount
        child.inc(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        key, child = self._slot(name, Gauge, labels)
        self._values[key] = float(value)
        child.set(value)

    def observe(self, name: str, value_ms: float, **labels: str) -> None:
        """One latency, in milliseconds, into the histogram ``name``."""
        buckets, child = self._hslot(name, labels)
        buckets.add(value_ms)
        child.observe(value_ms)

    def observe_many(self, name: str, values_ms: Iterable[float], **labels: str) -> None:
        """Several latencies at once (a batch of frames): the same counts as observing each."""
        self.observe_counted(name, count_latencies(list(values_ms)), **labels)

    def observe_counted(self, name: str, counted: Counted, **labels: str) -> None:
        """Latencies already counted per bucket (:func:`count_latencies`)."""
        buckets, child = self._hslot(name, labels)
        buckets.add_counted(counted)
        child.observe_counts(*counted)

    def _hslot(self, name: str, labels: dict[str, str]) -> tuple[_Buckets, _Histogram]:
        ident = (name, *labels.items())
        slot = self._hslots.get(ident)
        if slot is None:
            child = _family(name, Histogram, tuple(sorted(labels))).labels(self.client_id, *_ordered(labels))
            buckets = _Buckets()
            self._histograms[_key(name, labels)] = (name, labels, buckets)
            slot = self._hslots[ident] = (buckets, child)
        return slot

    def quantile(self, name: str, q: float, **labels: str) -> float | None:
        held = self._histograms.get(_key(name, labels))
        return None if held is None else held[2].quantile(q)

    def get(self, name: str, **labels: str) -> float:
        return self._values.get(_key(name, labels), 0.0)

    def total(self, name: str) -> float:
        """Sum of a metric over all its label values."""
        return sum(v for k, v in self._values.items() if k == name or k.startswith(name + "{"))

    def snapshot(self) -> dict[str, float]:
        out = dict(self._values)
        for name, labels, buckets in list(self._histograms.values()):
            out[_key(name + "_count", labels)] = float(buckets.count)
            out[_key(name + "_sum", labels)] = buckets.sum
            for q, tag in ((0.5, "_p50"), (0.99, "_p99")):
                value = buckets.quantile(q)
                if value is not None:
                    out[_key(name + tag, labels)] = value
        return out


def _ordered(labels: dict[str, str]) -> list[str]:
    return [labels[k] for k in sorted(labels)]


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={labels[k]}" for k in sorted(labels)) + "}"


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose every component's metrics at ``http://host:port/metrics`` for Prometheus to scrape."""
    start_http_server(port, addr=host)
