"""Device configs and profiles: every mistake is a ConfigError naming file, line, field and fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgewire.config import DeviceConfig, load_device_config
from edgewire.errors import ConfigError, EdgewireError
from edgewire.profiles import DeviceProfile, available_profiles, load_profile

VALID = """\
device_id: cam-01
source:
  kind: folder
  path: frames
model:
  path: models/m.onnx
"""


def write(folder: Path, text: str, name: str = "device.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_device_config(path)
    message = str(info.value)
    assert str(path) in message
    return message


# ---- good files ---------------------------------------------------------------------------


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_device_config(write(tmp_path, VALID))
    assert isinstance(cfg, DeviceConfig)
    assert cfg.device_id == "cam-01"
    assert cfg.fleet == "default" and cfg.profile == "x86-64-cpu"
    assert cfg.broker.url == "mqtt://127.0.0.1:1883"
    assert (cfg.broker.host, cfg.broker.port) == ("127.0.0.1", 1883)
    assert cfg.source.kind == "folder"
    assert cfg.cloud is None
    assert cfg.judge.min_sharpness is None


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc" / "edgewire"
    conf_dir.mkdir(parents=True)
    path = write(conf_dir, VALID)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter

    cfg = load_device_config(path)
    assert cfg.model.path == conf_dir.resolve() / "models" / "m.onnx"
    assert cfg.source.path == conf_dir.resolve() / "frames"
    assert cfg.model.path.is_absolute() and cfg.source.path.is_absolute()

    # The same file given by a relative path resolves the same way.
    monkeypatch.chdir(tmp_path)
    assert load_device_config(Path("etc/edgewire/device.yaml")).model.path == cfg.model.path


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    model, frames = tmp_path / "abs" / "m.onnx", tmp_path / "abs" / "frames"
    path = write(
        tmp_path,
        f"""\
        device_id: cam-01
        source: {{kind: folder, path: "{frames}"}}
        model: {{path: "{model}"}}
        """,
    )
    cfg = load_device_config(path)
    assert cfg.model.path == model
    assert cfg.source.path == frames


def test_source_without_a_path_stays_without_one(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: cam-01\nsource: {kind: mqtt}\nmodel: {path: m.onnx}\n")
    cfg = load_device_config(path)
    assert cfg.source.path is None
    assert cfg.model.path == tmp_path.resolve() / "m.onnx"


# ---- unknown keys ---------------------------------------------------------------------------


def test_unknown_nested_key_names_file_line_and_suggests(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        device_id: cam-01
        broker:
          url: mqtt://127.0.0.1:1883
          keepalve: 30
        source:
          kind: folder
          path: frames
        model:
          path: m.onnx
        """,
    )
    message = config_error(path)
    assert f"{path}:4: broker.keepalve: unknown key" in message
    assert "did you mean 'keepalive'?" in message
    assert "allowed: url, discover, mdns_interfaces, mdns_timeout_s, username, password, keepalive" in message


def test_unknown_key_in_judge_section(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "judge:\n  min_confidance: 0.5\n")
    message = config_error(path)
    assert f"{path}:8: judge.min_confidance" in message
    assert "did you mean 'min_confidence'?" in message


def test_unknown_top_level_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: cam-01\nsource: {kind: mqtt}\nmodle:\n  path: m.onnx\n")
    message = config_error(path)
    assert f"{path}:3: modle: unknown key -- did you mean 'model'?" in message
    # The real field is then missing, and said so as well.
    assert "model: required field is missing" in message


def test_unknown_key_without_a_close_match_says_remove_it(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "zzzz: 1\n")
    message = config_error(path)
    assert f"{path}:7: zzzz: unknown key -- remove it" in message
    assert "did you mean" not in message


# ---- missing, wrong values --------------------------------------------------------------------


def test_missing_required_field(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: cam-01\nsource:\n  kind: folder\n  path: frames\n")
    message = config_error(path)
    assert "model: required field is missing -- add it" in message


def test_missing_nested_required_field_names_its_section_line(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: cam-01\nsource:\n  path: frames\nmodel:\n  path: m.onnx\n")
    message = config_error(path)
    assert f"{path}:2: source.kind: required field is missing" in message


def test_source_kind_that_needs_a_path(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: cam-01\nmodel: {path: m.onnx}\nsource:\n  kind: video\n")
    message = config_error(path)
    assert f"{path}:3: source:" in message
    assert "source kind 'video' needs 'path'" in message


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("http://broker.local:1883", "expected mqtt://HOST[:PORT]"),
        ("mqtt://", "expected mqtt://HOST[:PORT]"),
        ("127.0.0.1:1883", "expected mqtt://HOST[:PORT]"),
        ("mqtt://broker.local:99999", "port must be a number 1-65535"),
        ("mqtt://broker.local:port", "port must be a number 1-65535"),
    ],
)
def test_bad_broker_url(tmp_path: Path, url: str, hint: str) -> None:
    path = write(tmp_path, f'device_id: cam-01\nbroker:\n  url: "{url}"\nsource: {{kind: mqtt}}\nmodel: {{path: m}}\n')
    message = config_error(path)
    assert f"{path}:3: broker.url:" in message
    assert hint in message
    assert repr(url) in message


def test_good_broker_url_gives_host_and_port(tmp_path: Path) -> None:
    path = write(
        tmp_path, "device_id: d\nbroker: {url: 'mqtt://10.0.0.5:8883'}\nsource: {kind: mqtt}\nmodel: {path: m}\n"
    )
    broker = load_device_config(path).broker
    assert (broker.host, broker.port) == ("10.0.0.5", 8883)


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "pipeline:\n  max_batch: lots\n")
    message = config_error(path)
    assert f"{path}:8: pipeline.max_batch:" in message
    assert "valid integer" in message
    assert "'lots'" in message


def test_out_of_range_value(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "judge:\n  min_confidence: 1.5\n")
    message = config_error(path)
    assert f"{path}:8: judge.min_confidence:" in message
    assert "less than or equal to 1" in message


def test_bad_device_id(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("device_id: cam-01", 'device_id: "cam 01/x"'))
    message = config_error(path)
    assert f"{path}:1: device_id:" in message
    assert "must be 1-128 of A-Z a-z 0-9" in message


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        device_id: cam-01
        broker:
          url: http://x:1883
        source:
          kind: folder
          path: frames
        model:
          path: m.onnx
        pipeline:
          max_batch: lots
        """,
    )
    message = config_error(path)
    assert f"{path}:3: broker.url" in message
    assert f"{path}:10: pipeline.max_batch" in message
    assert message.startswith(f"invalid configuration in {path}:")


# ---- not a config at all ----------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: cam-01\nsource:\n  kind: folder\n   path: frames\nmodel:\n  path: m.onnx\n")
    message = config_error(path)
    assert f"{path}:4: YAML syntax error:" in message
    assert "mapping values are not allowed" in message


def test_yaml_unclosed_bracket(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: cam-01\nsource: {kind: mqtt}\nmodel: {path: m.onnx\n")
    message = config_error(path)
    assert "YAML syntax error" in message
    assert f"{path}:" in message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_document_that_is_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert "expected a mapping of keys" in message
    assert f"got {kind}" in message
    assert f"{path}:1: <document>" in message


def test_empty_file_lists_the_required_fields(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, ""))
    for field in ("device_id", "source", "model"):
        assert f"{field}: required field is missing" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "device.yaml"
    message = config_error(path)
    assert "cannot read configuration" in message
    assert "No such file" in message


def test_unreadable_path(tmp_path: Path) -> None:
    folder = tmp_path / "device.yaml"
    folder.mkdir()
    message = config_error(folder)
    assert "cannot read configuration" in message


def test_file_that_is_not_utf8_text(tmp_path: Path) -> None:
    path = tmp_path / "device.yaml"
    path.write_bytes(b"device_id: cam-01\nfleet: \xff\xfe\n")
    message = config_error(path)
    assert "cannot read configuration" in message


def test_config_error_is_an_edgewire_error() -> None:
    assert issubclass(ConfigError, EdgewireError)


# ---- profiles ---------------------------------------------------------------------------------


def test_shipped_profiles_are_listed() -> None:
    names = available_profiles()
    assert {"x86-64-cpu", "jetson-orin-nano-8gb"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", available_profiles())
def test_each_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name  # the file name and the name inside agree
    assert profile.backends and profile.precisions
    assert profile.limits.max_batch >= 1
    assert profile.onnxruntime.providers


def test_cpu_profile_runs_onnxruntime_only() -> None:
    profile = load_profile("x86-64-cpu")
    assert profile.backends == ["onnxruntime"]
    assert "onnxruntime" in load_profile("jetson-orin-nano-8gb").backends


def test_unknown_profile_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("raspberry-pi-9")
    message = str(info.value)
    assert "unknown device profile 'raspberry-pi-9'" in message
    for name in available_profiles():
        assert name in message


def test_profile_by_path(tmp_path: Path) -> None:
    text = "name: mine\ndescription: a test box\nbackends: [onnxruntime]\nprecisions: [fp32]\n"
    limits = "limits:\n  memory_limit_mb: 256\n  max_batch: 4\n  latency_budget_ms: 10\n"
    path = write(tmp_path, text + limits, name="mine.yaml")
    profile = load_profile(path)
    assert profile.name == "mine" and profile.limits.max_batch == 4

    bad = write(tmp_path, text + limits + "  max_batchh: 8\n", name="bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_profile(bad)
    assert f"{bad}:9: limits.max_batchh: unknown key -- did you mean 'max_batch'?" in str(info.value)


def test_profile_with_unknown_backend(tmp_path: Path) -> None:
    text = (
        "name: x\ndescription: y\nbackends: [openvino]\nprecisions: [fp32]\n"
        "limits: {memory_limit_mb: 1, max_batch: 1, latency_budget_ms: 1}\n"
    )
    path = write(tmp_path, text, name="x.yaml")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert f"{path}:3: backends.0:" in str(info.value)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("device_id: a\nsource:\n  kind: mqtt\nmodel:\n  path: m.onnx\ndevice_id: b\n")
    with pytest.raises(ConfigError) as info:
        load_device_config(path)
    assert f"{path}:6: device_id: duplicate key (first on line 1)" in str(info.value)


# ---- detectors ----------------------------------------------------------------------------


def test_detect_section_loads_with_its_judge_and_escalation(tmp_path: Path) -> None:
    text = VALID + textwrap.dedent(
        """\
        detect:
          score_threshold: 0.3
          judge:
            floor: 0.3
            ceiling: 0.7
            escalate_labels: [forklift]
            min_box_px: 12
            classes:
              person: {floor: 0.4, ceiling: 0.9}
          escalate:
            send: crops
            crop_margin: 0.25
        """
    )
    cfg = load_device_config(write(tmp_path, text))
    assert cfg.detect.judge.classes["person"].ceiling == 0.9
    assert cfg.detect.escalate.send == "crops" and cfg.detect.judge.escalate_labels == ["forklift"]


def test_detect_floor_above_ceiling_names_the_line_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "detect:\n  judge:\n    floor: 0.8\n    ceiling: 0.5\n")
    message = config_error(path)
    assert (
        f"{path}:8: detect.judge: Value error, floor 0.8 above ceiling 0.5: lower the floor or raise the ceiling"
        in message
    )


def test_detect_escalation_sends_only_frames_or_crops(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "detect:\n  escalate:\n    send: boxes\n")
    message = config_error(path)
    assert f"{path}:9: detect.escalate.send: Input should be 'frame' or 'crops'" in message
