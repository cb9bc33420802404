"""Numbers a component reports: kept once, exposed as Prometheus metrics and on telemetry topics.

Several components can live in one process (the demo runs a broker, a bridge and N devices),
so every metric carries a ``client`` label instead of relying on one registry per process.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, start_http_server

_FAMILIES: dict[str, Counter | Gauge] = {}
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
}


def _family(name: str, kind: type[Counter] | type[Gauge], labels: tuple[str, ...]) -> Counter | Gauge:
    key = f"edgewire_{name.removesuffix('_total')}" if kind is Counter else f"edgewire_{name}"
    with _LOCK:
        fam = _FAMILIES.get(key)
        if fam is None:
            fam = kind(key, DOCS.get(name, name), ("client", *labels))
            _FAMILIES[key] = fam
        return fam


class Meter:
    """One component's numbers; cheap enough to call once per frame."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self._values: dict[str, float] = {}
        # (name, kind, label items) -> (snapshot key, Prometheus child): a hot counter costs one
        # dict lookup, not a key built, a family looked up under a lock and a child resolved.
        self._slots: dict[tuple[Any, ...], tuple[str, Any]] = {}

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

    def get(self, name: str, **labels: str) -> float:
        return self._values.get(_key(name, labels), 0.0)

    def total(self, name: str) -> float:
        """Sum of a metric over all its label values."""
        return sum(v for k, v in self._values.items() if k == name or k.startswith(name + "{"))

    def snapshot(self) -> dict[str, float]:
        return dict(self._values)


def _ordered(labels: dict[str, str]) -> list[str]:
    return [labels[k] for k in sorted(labels)]


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={labels[k]}" for k in sorted(labels)) + "}"


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose every component's metrics over HTTP for Prometheus to scrape."""
    start_http_server(port, addr=host)
