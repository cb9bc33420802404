"""Every MQTT topic edgewire uses, built and parsed in this one place.

The table here mirrors topics.md line for line (a test keeps them equal). Wherever a device
publishes, its id is a topic level of its own, so a broker ACL can pin a device to its own
topics by username or client id (``pattern write req/%u/#`` in Mosquitto).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgewire import envelopes as env
from edgewire.errors import TopicError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")
_LEVEL_RULES = {"index": _INDEX}

SHARED_PREFIX = "$share"


@dataclass(frozen=True)
class TopicSpec:
    """One topic family: its pattern, delivery guarantees and payload schema."""

    name: str
    pattern: str
    qos: int
    retain: bool
    payload: type[env.Envelope]
    direction: str

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.pattern.split("/"))

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(level[1:-1] for level in self.levels if level.startswith("{"))

    def build(self, **values: str | int) -> str:
        """The concrete topic; every parameter is required and validated."""
        missing = set(self.params) - set(values)
        extra = set(values) - set(self.params)
        if missing or extra:
            raise TopicError(f"{self.name}: needs {sorted(self.params)}, got {sorted(values)}")
        return "/".join(self._level(level, values) for level in self.levels)

    def filter(self, **values: str | int) -> str:
        """A subscription filter: parameters not given become ``+``."""
        extra = set(values) - set(self.params)
        if extra:
            raise TopicError(f"{self.name}: unknown parameters {sorted(extra)}")
        return "/".join(
            "+" if level.startswith("{") and level[1:-1] not in values else self._level(level, values)
            for level in self.levels
        )

    def shared_filter(self, group: str, **values: str | int) -> str:
        """MQTT 5 shared subscription, so several consumers split one family's load."""
        _check(group, "group", _ID)
        return f"{SHARED_PREFIX}/{group}/{self.filter(**values)}"

    def match(self, topic: str) -> dict[str, str] | None:
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        values: dict[str, str] = {}
        for part, level in zip(parts, self.levels, strict=True):
            if level.startswith("{"):
                key = level[1:-1]
                if not _LEVEL_RULES.get(key, _ID).match(part):
                    return None
                values[key] = part
            elif part != level:
                return None
        return values

    def _level(self, level: str, values: dict[str, str | int]) -> str:
        if not level.startswith("{"):
            return level
        key = level[1:-1]
        return _check(str(values[key]), key, _LEVEL_RULES.get(key, _ID))


def _check(value: str, key: str, rule: re.Pattern[str]) -> str:
    if not rule.match(value):
        raise TopicError(f"{key}={value!r} is not a valid topic level (allowed: {rule.pattern})")
    return value


@dataclass(frozen=True)
class ParsedTopic:
    spec: TopicSpec
    values: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.values[key]


REQUEST = TopicSpec("request", "req/{device_id}/{trace_id}", 1, False, env.Request, "device → bridge")
RESULT = TopicSpec("result", "result/{device_id}", 1, False, env.Result, "bridge → device")
LOCAL = TopicSpec("local", "local/{device_id}", 0, False, env.LocalResults, "device → monitors")
INPUT = TopicSpec("input", "input/{device_id}", 0, False, env.Frame, "any → device")
MODEL_ANNOUNCE = TopicSpec("model_announce", "model/announce/{model}", 1, True, env.Manifest, "distributor → devices")
MODEL_CHUNK = TopicSpec(
    "model_chunk", "model/chunk/{model}/{version}/{index}", 1, False, env.Chunk, "operator, distributor → devices"
)
MODEL_RESEND = TopicSpec(
    "model_resend",
    "model/resend/{device_id}/{model}/{version}/{index}",
    1,
    False,
    env.Chunk,
    "distributor → device",
)
MODEL_FETCH = TopicSpec(
    "model_fetch", "model/fetch/{device_id}/{model}", 1, False, env.FetchRequest, "device → distributor"
)
MODEL_STATUS = TopicSpec(
    "model_status", "model/status/{device_id}/{model}", 1, True, env.ModelStatus, "device → operators"
)
PRESENCE = TopicSpec("presence", "presence/{client_id}", 1, True, env.Presence, "any → all")
TELEMETRY = TopicSpec("telemetry", "telemetry/{client_id}", 0, False, env.Telemetry, "any → monitors")
CONFIG_DESIRED = TopicSpec(
    "config_desired", "config/desired/{device_id}", 1, True, env.DesiredConfig, "operator → device"
)
CONFIG_FLEET = TopicSpec("config_fleet", "config/fleet/{fleet}", 1, True, env.DesiredConfig, "operator → devices")
CONFIG_REPORTED = TopicSpec(
    "config_reported", "config/reported/{device_id}", 1, True, env.ReportedConfig, "device → operators"
)

TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        REQUEST,
        RESULT,
        LOCAL,
        INPUT,
        MODEL_ANNOUNCE,
        MODEL_CHUNK,
        MODEL_RESEND,
        MODEL_FETCH,
        MODEL_STATUS,
        PRESENCE,
        TELEMETRY,
        CONFIG_DESIRED,
        CONFIG_FLEET,
        CONFIG_REPORTED,
    )
}


def parse(topic: str) -> ParsedTopic:
    """Which family a concrete topic belongs to, and its parameters; TopicError if none."""
    if topic.startswith(SHARED_PREFIX + "/"):
        topic = topic.split("/", 2)[2] if topic.count("/") >= 2 else topic
    for spec in TOPICS.values():
        values = spec.match(topic)
        if values is not None:
            return ParsedTopic(spec, values)
    raise TopicError(f"{topic!r} is not an edgewire topic (see topics.md)")
