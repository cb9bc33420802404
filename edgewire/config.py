"""Validated configuration files, with errors that point at the file, the line and the fix.

Every file an operator writes (device config, profiles, later fleet templates and rule files)
is loaded through :func:`load_yaml_model`: YAML is parsed keeping line marks, validated by a
pydantic model that forbids unknown keys, and any problem becomes one ConfigError listing
``file:line: field: what is wrong -- how to fix it``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgewire.errors import ConfigError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- loading ------------------------------------------------------------------------------


def _line_marks(node: yaml.Node | None, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each key path in a YAML document to its 1-based line."""
    marks: dict[tuple[Any, ...], int] = {}
    if node is None:
        return marks
    marks[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            marks.update(_line_marks(value_node, (*path, key)))
            marks[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks.update(_line_marks(item, (*path, i)))
    return marks


def _duplicate_keys(node: yaml.Node | None, path: tuple[Any, ...] = ()) -> list[str]:
    """YAML lets a later key silently win over an earlier one; a config must not."""
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                field = ".".join(str(p) for p in (*path, key_node.value))
                found.append(f"{line}: {field}: duplicate key (first on line {seen[key_node.value]}) -- keep one")
            seen.setdefault(key_node.value, line)
            found += _duplicate_keys(value_node, (*path, key_node.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, (*path, i))
    return found


def _line_for(marks: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in marks:
            return marks[loc[:end]]
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at ``loc``, for did-you-mean hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            break
        current = _model_in(field.annotation)
        if current is None:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _hint(model: type[BaseModel], err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        fix = f"did you mean '{close[0]}'?" if close else "remove it"
        return f"unknown key -- {fix} (allowed: {', '.join(allowed)})"
    if err["type"] == "missing":
        return "required field is missing -- add it"
    return f"{err['msg']} -- got {err.get('input')!r}"


def format_validation_error(path: Path, exc: ValidationError, model: type[BaseModel], marks: dict) -> str:
    lines = [f"invalid configuration in {path}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        line = _line_for(marks, loc)
        where = f"{path}:{line}" if line else str(path)
        field = ".".join(_key_text(p) for p in loc) or "<document>"
        lines.append(f"  {where}: {field}: {_hint(model, err)}")
    return "\n".join(lines)


def _key_text(key: object) -> str:
    """A key as one printable piece of text: a key holding line breaks or control characters
    is shown escaped, so that each problem stays on a line of its own."""
    text = str(key)
    return text if text.isprintable() else repr(text)


def load_yaml_model(path: str | Path, model: type[M], *, context: dict[str, Any] | None = None) -> M:
    """Read, parse and validate one YAML file into ``model``; ConfigError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read configuration {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    return parse_yaml_model(text, model, source=path, context=context)


def parse_yaml_model(text: str, model: type[M], *, source: Path, context: dict[str, Any] | None = None) -> M:
    try:
        return _parse_yaml_model(text, model, source=source, context=context)
    except RecursionError:
        # Thousands of nested brackets, or an alias that contains itself (`a: &x [*x]`).
        raise ConfigError(
            f"invalid configuration in {source}:\n  {source}: nested too deeply, or an alias (*name) refers to "
            "itself; write the values out"
        ) from None


def _parse_yaml_model(text: str, model: type[M], *, source: Path, context: dict[str, Any] | None = None) -> M:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid configuration in {source}:\n  {where}: YAML syntax error: {problem}") from None
    duplicates = _duplicate_keys(node)
    if duplicates:
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(f"  {source}:{d}" for d in duplicates))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid configuration in {source}:\n  {source}:1: <document>: expected a mapping of keys, "
            f"got {type(data).__name__}"
        )
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model, _line_marks(node))) from None


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``, nested maps merged key by key (for layered configs)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---- the device's configuration ----------------------------------------------------------


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError("must be 1-128 of A-Z a-z 0-9 . _ - and start with a letter or digit")
    return value


class BrokerSettings(StrictModel):
    # mqtt://HOST:PORT, or "auto" to find a broker by mDNS (_mqtt._tcp).
    url: str = "mqtt://127.0.0.1:1883"
    # With a url: fall back to mDNS when the configured broker does not answer.
    discover: bool = False
    # Where mDNS queries go: IPv4 addresses of interfaces, or ["all"].
    mdns_interfaces: list[str] = Field(default_factory=lambda: ["all"])
    mdns_timeout_s: float = Field(3.0, gt=0)
    username: str | None = None
    password: str | None = None
    keepalive: int = Field(30, ge=5, le=3600)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    # Keep the session at the broker while away (clean session off / session expiry), so answers,
    # announces and config published while the device was offline reach it when it returns.
    persistent_session: bool = True
    session_expiry_s: int = Field(7 * 86_400, ge=0)
    # Reconnect backoff (capped exponential, full jitter): the first retry after a lost link is
    # drawn from [0, reconnect_min_s], so a fleet dropped by a broker restart comes back spread
    # over that window; each failed attempt doubles the window up to reconnect_max_s.
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    # At start a device waits this long for the broker, then runs anyway (answering locally).
    startup_wait_s: float = Field(5.0, ge=0)
    # TLS (an mqtts:// url): the CA that signed the broker's certificate (the system's CAs when
    # absent) and, for mutual TLS, this client's certificate and key.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v == "auto":
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("expected mqtt://HOST[:PORT], mqtts://HOST[:PORT] (TLS) or auto")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("port must be a number 1-65535") from None
        return v

    @model_validator(mode="after")
    def _backoff(self) -> BrokerSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_min_s ({self.reconnect_min_s}) "
                "-- the cap must be at least the first window"
            )
        return self

    @property
    def uses_mdns(self) -> bool:
        return self.url == "auto" or self.discover

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @model_validator(mode="after")
    def _tls_files(self) -> BrokerSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError("ca_file, cert_file and key_file are for an mqtts:// url")
        return self


class SourceSettings(StrictModel):
    kind: Literal["folder", "video", "camera", "mqtt"]
    path: Path | None = Field(None, description="image folder or video file")
    device: int | str | None = Field(None, description="camera index or GStreamer pipeline")
    pattern: str = "*"
    loop: bool = False
    fps: float = Field(0.0, ge=0, description="0 plays as fast as the pipeline runs")
    max_frames: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _needs(self) -> SourceSettings:
        if self.kind in ("folder", "video") and self.path is None:
            raise ValueError(f"source kind '{self.kind}' needs 'path'")
        if self.kind == "camera" and self.device is None:
            raise ValueError("source kind 'camera' needs 'device' (an index like 0, or a GStreamer pipeline)")
        return self


class ModelSettings(StrictModel):
    path: Path
    # A lighter model (e.g. INT8 or smaller) with the same labels and input, used while degraded
    # and the frame queue is at least half full, so an overloaded device keeps up.
    fallback: Path | None = None


class JudgeSettings(StrictModel):
    """When a local answer is not good enough and the frame is a hard case."""

    min_confidence: float = Field(0.7, ge=0, le=1)
    min_margin: float = Field(0.0, ge=0, le=1)
    unknown_labels: list[str] = Field(default_factory=list)
    # Variance of the Laplacian below this marks a frame blurry; null turns the policy off.
    min_sharpness: float | None = Field(None, ge=0)


class ClassRule(StrictModel):
    """One class's own uncertainty band, replacing ``detect.judge``'s floor and ceiling for it."""

    floor: float = Field(ge=0, le=1)
    ceiling: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> ClassRule:
        if self.floor > self.ceiling:
            raise ValueError(f"floor {self.floor} above ceiling {self.ceiling}: lower the floor or raise the ceiling")
        return self


class ObjectJudgeSettings(StrictModel):
    """When a detected object is uncertain, and when a frame goes to the cloud for it."""

    # A box scoring in [floor, ceiling) is uncertain; at or above the ceiling it is sure.
    floor: float = Field(0.25, ge=0, le=1)
    ceiling: float = Field(0.6, ge=0, le=1)
    # Labels always escalated (a class the edge model is known to confuse); a class index the
    # model's labels do not name is always uncertain too.
    escalate_labels: list[str] = Field(default_factory=list)
    # A box whose shorter side is below this many source pixels is uncertain (0: off).
    min_box_px: float = Field(0.0, ge=0)
    # A box whose crop's Laplacian variance is below this is uncertain (blurred); null: off.
    min_sharpness: float | None = Field(None, ge=0)
    # A frame escalates when it holds at least this many uncertain boxes.
    min_uncertain: int = Field(1, ge=1)
    # Per label: its own floor and ceiling.
    classes: dict[str, ClassRule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ordered(self) -> ObjectJudgeSettings:
        if self.floor > self.ceiling:
            raise ValueError(f"floor {self.floor} above ceiling {self.ceiling}: lower the floor or raise the ceiling")
        return self


class DetectEscalation(StrictModel):
    """What goes up for a frame with uncertain objects."""

    # frame: the whole encoded frame; crops: only the uncertain boxes (plus margin), as JPEGs
    # with their coordinates (Request.crops), which saves uplink bytes.
    send: Literal["frame", "crops"] = "frame"
    # Margin around each crop, as a fraction of the box's width and height.
    crop_margin: float = Field(0.15, ge=0, le=2)
    crop_quality: int = Field(90, ge=10, le=100)


class TrackSettings(StrictModel):
    """Objects followed across frames (edge/tracker.py), so an uncertain one goes up once per
    track (edge/track_escalation.py) and the cloud's answer sticks to it."""

    # null: on for video, camera and mqtt sources (frames in time order), off for a folder.
    enabled: bool | None = None
    # A box continues a track when it overlaps the track's last box by at least this much.
    iou_threshold: float = Field(0.3, gt=0, le=1)
    # A track not seen for this many frames ends (its cloud answer with it).
    max_missed: int = Field(5, ge=0, le=1000)
    # Asked again when the box's shape changes (centred overlap below this) ...
    min_box_iou: float = Field(0.5, ge=0, le=1)
    # ... or its score moves by more than this.
    score_delta: float = Field(0.2, ge=0, le=1)


class DetectSettings(StrictModel):
    """Detectors only (a model whose metadata says ``task: detect``): decode, judge, escalate."""

    # Boxes scoring below this are no objects at all.
    score_threshold: float = Field(0.25, ge=0, le=1)
    iou_threshold: float = Field(0.45, gt=0, le=1)
    max_detections: int = Field(100, ge=1, le=10_000)
    # Probability-map detectors (DB text): pixel threshold and how far boxes grow.
    map_threshold: float = Field(0.3, gt=0, lt=1)
    unclip_ratio: float = Field(1.6, ge=0, le=10)
    judge: ObjectJudgeSettings = Field(default_factory=ObjectJudgeSettings)
    escalate: DetectEscalation = Field(default_factory=DetectEscalation)
    track: TrackSettings = Field(default_factory=TrackSettings)


class OutboxSettings(StrictModel):
    """Where escalations wait until the broker has them, and what happens when it fills up."""

    # SQLite file (WAL, fsync per group commit); null keeps the queue in memory, lost on a crash.
    path: Path | None = None
    max_messages: int = Field(10_000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_age_s: float = Field(86_400.0, gt=0)
    when_full: Literal["drop_oldest", "drop_lowest_priority", "refuse"] = "drop_oldest"
    # Replay pace once the link returns, so a returning fleet does not flood the bridge.
    replay_per_s: float = Field(500.0, gt=0)
    # A request the broker took but no answer came for is sent again after this long (doubling
    # per attempt), and at once after a reconnect; the bridge's dedupe makes that harmless.
    resend_after_s: float = Field(10.0, gt=0)
    # A request past its deadline when its turn comes: expire it on the device (its frame is
    # recorded TIMEOUT), or forward it late so the cloud keeps it for audit.
    late: Literal["expire", "forward"] = "expire"


class CloudSettings(StrictModel):
    """Escalation of hard frames to the cloud bridge over MQTT."""

    deadline_ms: int = Field(2000, gt=0)
    model_hint: str | None = None
    # prefer_cloud: the cloud's answer replaces the local one; max_confidence: the surer one wins.
    merge: Literal["prefer_cloud", "max_confidence"] = "prefer_cloud"
    # Escalations waiting for an answer at once; beyond this, hard frames are answered locally.
    max_pending: int = Field(1024, ge=1)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    # While degraded, hard frames are answered locally at once and their requests still queued
    # with this deadline, so the cloud's answer arrives later as a late result; 0 stops queuing.
    offline_deadline_s: float = Field(600.0, ge=0)
    # Consecutive timeouts or unavailable answers that switch the device to degraded mode.
    degraded_after: int = Field(3, ge=1)


class PipelineSettings(StrictModel):
    max_batch: int = Field(16, ge=1, le=1024)
    # Threads that decode, preprocess and infer micro-batches side by side.
    workers: int = Field(2, ge=1, le=64)
    queue_size: int = Field(64, ge=1)


class AdvertiseSettings(StrictModel):
    """The device's own _edgewire._tcp record, so operators find it with `edgewire discover`."""

    address: str = Field(description="IPv4 address of the interface to advertise on")
    port: int = Field(9, ge=1, le=65535, description="service port in the record (metrics port if any)")


class DeliverySettings(StrictModel):
    """Models pushed over MQTT: where they land, who must have signed them, how many to keep."""

    # Folder of received models (one sub-folder per model and version) and download state.
    store: Path
    # The fleet's Ed25519 public key (`edgewire keys show`); a manifest must carry its signature.
    public_key: Path | None = None
    # Accept unsigned models: for a lab without keys, never for a fleet in the field.
    allow_unsigned: bool = False
    # Installed versions kept for rollback, the active one included.
    keep_versions: int = Field(3, ge=2, le=50)
    # Ask the distributor for missing chunks after this long without one arriving.
    fetch_after_s: float = Field(1.0, gt=0)
    # After a swap the new version is on probation this long; a regression past the bounds below
    # rolls the device back on its own.
    probation_s: float = Field(10.0, ge=0)
    max_latency_ratio: float = Field(2.0, gt=1)
    # ... and slower by at least this much per frame, so batch-size noise on a tiny model is no regression.
    min_latency_regression_ms: float = Field(0.5, ge=0)
    max_error_rate: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _key(self) -> DeliverySettings:
        if self.public_key is None and not self.allow_unsigned:
            raise ValueError(
                "needs 'public_key' (the fleet's signing key from `edgewire keys show`) "
                "or 'allow_unsigned: true' for a lab setup"
            )
        return self


class PublishSettings(StrictModel):
    local_results: bool = True
    # At most one local/<device> message per this many ms: a paced camera's batches still leave
    # one by one, a backlog's share messages instead of one write per batch (0: every batch).
    local_min_interval_ms: float = Field(20.0, ge=0, le=10_000)
    telemetry_interval_s: float = Field(5.0, gt=0)
    # Stamp each escalation's hop times into its final result (edgewire trace reads them).
    hop_stamps: bool = True


class DeviceConfig(StrictModel):
    device_id: str
    fleet: str = "default"
    profile: str = "x86-64-cpu"
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    source: SourceSettings
    model: ModelSettings
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    detect: DetectSettings = Field(default_factory=DetectSettings)
    cloud: CloudSettings | None = None
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = Field("127.0.0.1", description="address /metrics listens on (0.0.0.0: every interface)")
    advertise: AdvertiseSettings | None = None
    delivery: DeliverySettings | None = None

    @field_validator("device_id", "fleet")
    @classmethod
    def _ids(cls, v: str) -> str:
        return _check_id(v)


def load_device_config(path: str | Path) -> DeviceConfig:
    """Load a device config; relative paths inside it are taken from the file's folder."""
    path = Path(path)
    cfg = load_yaml_model(path, DeviceConfig)
    base = path.resolve().parent
    updates: dict[str, Any] = {}
    model_paths = {"path": cfg.model.path, "fallback": cfg.model.fallback}
    fixed_model = {k: base / v for k, v in model_paths.items() if v is not None and not v.is_absolute()}
    if fixed_model:
        updates["model"] = cfg.model.model_copy(update=fixed_model)
    if cfg.cloud is not None and cfg.cloud.outbox.path is not None and not cfg.cloud.outbox.path.is_absolute():
        outbox = cfg.cloud.outbox.model_copy(update={"path": base / cfg.cloud.outbox.path})
        updates["cloud"] = cfg.cloud.model_copy(update={"outbox": outbox})
    if cfg.source.path is not None and not cfg.source.path.is_absolute():
        updates["source"] = cfg.source.model_copy(update={"path": base / cfg.source.path})
    if cfg.delivery is not None:
        paths = {"store": cfg.delivery.store, "public_key": cfg.delivery.public_key}
        fixed = {k: base / v for k, v in paths.items() if v is not None and not v.is_absolute()}
        if fixed:
            updates["delivery"] = cfg.delivery.model_copy(update=fixed)
    return cfg.model_copy(update=updates) if updates else cfg
