"""The fleet at a glance, folded from its topics: one row per client, from MQTT alone.

A pure fold: :meth:`FleetView.apply` takes one message (topic, payload, the time it arrived) and
updates the rows; :meth:`FleetView.rows` and :func:`summary` read them. Nothing here touches a
network or a screen, so ``edgewire monitor`` renders it (terminal or JSON lines) and tests feed
it recorded messages.

What it reads: retained ``presence/+`` (who is there, online or not, degraded, which models),
``telemetry/+`` (rates, latencies, outbox, drops, errors, the machine), retained
``model/status/+/+`` (where a rollout stands on each device), retained ``config/reported/+`` and,
when asked for, ``local/+`` (to count results and see a device alive between two reports).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import msgpack

from edgewire import envelopes as env
from edgewire import topics
from edgewire.errors import DecodeError, TopicError

ONLINE, DEGRADED, OFFLINE = "online", "degraded", "offline"
KINDS_ORDER = {"device": 0, "bridge": 1, "distributor": 2, "broker": 3, "operator": 4}
#: Model steps after which a rollout on a device is over.
SETTLED = ("active", "failed", "rolled_back")
#: Sort keys the monitor accepts.
SORT_KEYS = ("id", "state", "fleet", "fps", "p99", "errors")


@dataclass
class Row:
    """What the fleet has said about one client; every figure is None until a message gives it."""

    client_id: str
    kind: str = "device"
    fleet: str | None = None
    profile: str | None = None
    state: str = ONLINE
    #: When the client went offline (epoch seconds), for "offline 42 s".
    offline_since: float | None = None
    last_seen: float = 0.0
    models: dict[str, str] = field(default_factory=dict)
    #: Per model: the latest step the device reported for it ("2.0.0 downloading 40%", "2.0.0 active").
    rollout: dict[str, str] = field(default_factory=dict)
    fps: float | None = None
    escalation_rate: float | None = None
    p50_local_ms: float | None = None
    p99_local_ms: float | None = None
    p50_escalated_ms: float | None = None
    p99_escalated_ms: float | None = None
    outbox: float | None = None
    drops: float | None = None
    errors: float | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    temperature_c: float | None = None
    requests: float | None = None
    config: str | None = None
    results_seen: int = 0

    def as_json(self, now: float) -> dict[str, Any]:
        doc = dict(self.__dict__)
        doc["offline_s"] = None if self.offline_since is None else round(now - self.offline_since, 1)
        return doc


def _sum(metrics: dict[str, float], *names: str) -> float | None:
    """Sum of the metrics (with any labels) named; None when none of them is there."""
    found = [v for k, v in metrics.items() for n in names if k == n or k.startswith(n + "{")]
    return sum(found) if found else None


class FleetView:
    def __init__(self) -> None:
        self.clients: dict[str, Row] = {}
        self.rejected = 0
        self._last_metrics: dict[str, dict[str, float]] = {}  # client -> its previous telemetry

    def _row(self, client_id: str) -> Row:
        row = self.clients.get(client_id)
        if row is None:
            row = self.clients[client_id] = Row(client_id)
        return row

    def apply(self, topic: str, payload: bytes, received: float) -> bool:
        """Fold one message in; False when it is not one this view reads (or is malformed)."""
        local = topics.LOCAL.match(topic)
        if local is not None:
            return self._results(local["device_id"], payload, received)
        try:
            parsed = topics.parse(topic)
            message = env.decode(parsed.spec.payload, payload)
        except (TopicError, DecodeError):
            self.rejected += 1
            return False
        if isinstance(message, env.Presence):
            self._presence(message, received)
        elif isinstance(message, env.Telemetry):
            self._telemetry(message, received)
        elif isinstance(message, env.ModelStatus):
            self._model_status(message)
        elif isinstance(message, env.ReportedConfig):
            row = self._row(message.device_id)
            row.config = f"r{message.revision} {message.status}"
        else:
            return False
        return True

    def _results(self, device_id: str, payload: bytes, received: float) -> bool:
        """Results only say the device is alive and how many frames it answered: they are
        counted, not validated row by row (the heaviest traffic a monitor reads)."""
        try:
            doc = msgpack.unpackb(payload, raw=False) if len(payload) <= env.LocalResults.MAX_BYTES else None
        except Exception:  # msgpack raises a zoo of types for garbage input
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list) or doc.get("device_id") != device_id:
            self.rejected += 1
            return False
        row = self._row(device_id)
        row.results_seen += len(doc["results"])
        row.last_seen = max(row.last_seen, received)
        if row.state == OFFLINE and row.offline_since is not None and received > row.offline_since:
            row.state, row.offline_since = ONLINE, None
        return True

    def _presence(self, p: env.Presence, received: float) -> None:
        row = self._row(p.client_id)
        row.kind, row.fleet, row.profile = p.kind, p.fleet or row.fleet, p.profile or row.profile
        if p.models:
            row.models = dict(p.models)
        if p.online:
            row.state = DEGRADED if p.state == DEGRADED else ONLINE
            row.offline_since = None
            row.last_seen = max(row.last_seen, received)
        else:
            was_online = row.state != OFFLINE and row.last_seen > 0
            row.state = OFFLINE
            # Seen online before: it went offline now. A retained will read at start: it went
            # offline some time after it was last heard of, which is all that is known.
            row.offline_since = received if was_online else max(p.ts, row.last_seen)

    def _telemetry(self, t: env.Telemetry, received: float) -> None:
        row = self._row(t.client_id)
        m, before = t.metrics, self._last_metrics.get(t.client_id, {})
        row.last_seen = max(row.last_seen, received)
        if row.state == OFFLINE:
            row.state, row.offline_since = ONLINE, None
        row.fps = m.get("pipeline_fps", row.fps)
        done, escalated = _sum(m, "frames_completed_total"), _sum(m, "frames_escalated_total")
        if done is not None:
            d_done = done - (_sum(before, "frames_completed_total") or 0.0)
            d_esc = (escalated or 0.0) - (_sum(before, "frames_escalated_total") or 0.0)
            if d_done > 0:
                row.escalation_rate = d_esc / d_done
            elif done > 0:
                row.escalation_rate = (escalated or 0.0) / done
        row.p50_local_ms = m.get("frame_latency_ms_p50{path=local}", row.p50_local_ms)
        row.p99_local_ms = m.get("frame_latency_ms_p99{path=local}", row.p99_local_ms)
        row.p50_escalated_ms = m.get("frame_latency_ms_p50{path=escalated}", row.p50_escalated_ms)
        row.p99_escalated_ms = m.get("frame_latency_ms_p99{path=escalated}", row.p99_escalated_ms)
        if row.kind == "bridge" or "requests_inflight" in m:
            row.p50_escalated_ms = m.get("bridge_step_ms_p50{step=total}", row.p50_escalated_ms)
            row.p99_escalated_ms = m.get("bridge_step_ms_p99{step=total}", row.p99_escalated_ms)
            row.requests = _sum(m, "requests_total")
        row.outbox = m.get("outbox_depth", row.outbox)
        # A counter is reported once it has counted something: not there yet means none so far.
        row.drops = _sum(m, "frames_dropped_total", "publish_dropped_total", "escalations_expired_total") or 0.0
        row.errors = _sum(m, "frames_failed_total", "messages_rejected_total", "requests_failed_total") or 0.0
        row.cpu_percent = m.get("cpu_percent")
        row.memory_percent = m.get("memory_used_percent")
        row.temperature_c = m.get("temperature_c")
        self._last_metrics[t.client_id] = dict(m)

    def _model_status(self, s: env.ModelStatus) -> None:
        row = self._row(s.device_id)
        step = f"downloading {s.progress:.0%}" if s.state == "downloading" else s.state
        if s.state == "active":
            row.models[s.name] = s.version  # the presence refresh may come later
        row.rollout[s.name] = f"{s.version} {step}" + (f" ({s.reason})" if s.reason else "")

    # -- reading -----------------------------------------------------------------------------

    def rows(
        self,
        *,
        selector: str | None = None,
        fleet: str | None = None,
        state: str | None = None,
        sort: str = "id",
    ) -> list[Row]:
        """Rows matching a device-id glob, a fleet and a state; devices first, then bridges and
        the distributor, each group sorted by ``sort``."""
        picked = [
            r
            for r in self.clients.values()
            if (selector is None or fnmatch.fnmatchcase(r.client_id, selector))
            and (fleet is None or r.fleet == fleet)
            and (state is None or r.state == state)
        ]

        def key(r: Row) -> tuple[Any, ...]:
            group = KINDS_ORDER.get(r.kind, 9)
            if sort == "state":
                return (group, {OFFLINE: 0, DEGRADED: 1, ONLINE: 2}[r.state], r.client_id)
            if sort == "fleet":
                return (group, r.fleet or "", r.client_id)
            if sort == "fps":
                return (group, -(r.fps or 0.0), r.client_id)
            if sort == "p99":
                return (group, -(r.p99_escalated_ms or r.p99_local_ms or 0.0), r.client_id)
            if sort == "errors":
                return (group, -(r.errors or 0.0), r.client_id)
            return (group, r.client_id)

        return sorted(picked, key=key)


def summary(rows: list[Row]) -> dict[str, Any]:
    """The fleet summary line: devices by state, total frames/s, rollouts in flight."""
    devices = [r for r in rows if r.kind == "device"]
    return {
        "devices": len(devices),
        ONLINE: sum(r.state == ONLINE for r in devices),
        DEGRADED: sum(r.state == DEGRADED for r in devices),
        OFFLINE: sum(r.state == OFFLINE for r in devices),
        "fps": round(sum(r.fps or 0.0 for r in devices if r.state != OFFLINE), 1),
        "rollouts": sum(not step.split(" ")[1].startswith(SETTLED) for r in devices for step in r.rollout.values()),
        "bridges": sum(r.kind == "bridge" and r.state != OFFLINE for r in rows),
    }


#: What the monitor subscribes to.
FILTERS: tuple[tuple[str, int], ...] = (
    (topics.PRESENCE.filter(), 1),
    (topics.TELEMETRY.filter(), 0),
    (topics.MODEL_STATUS.filter(), 1),
    (topics.CONFIG_REPORTED.filter(), 1),
)
#: Every result of every device: the heaviest traffic on the broker, read only when asked for
#: (telemetry already carries the rates; results add a count and liveness between two reports).
RESULTS_FILTER = (topics.LOCAL.filter(), 0)
