"""The ``edgewire`` command: its help, clean exit-2 errors for bad device configurations, and watch."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import typer.main
from typer.testing import CliRunner, Result

from edgewire import envelopes, topics
from edgewire.cli import app

runner = CliRunner()


def _command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group below ``command`` (typer vendors its own click, so duck-type it)."""
    paths = [prefix]
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


COMMAND_PATHS = _command_paths(typer.main.get_command(app))


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def flat(text: str) -> str:
    """Output without whitespace or the help table's borders: Rich wraps long lines (and
    paths) at the terminal width, inside the table's cells."""
    return "".join(text.replace("│", " ").split())


def assert_says(result: Result, *parts: str) -> None:
    for part in parts:
        assert flat(part) in flat(result.output), f"{part!r} not in output:\n{result.output}"


def write_config(folder: Path, text: str) -> Path:
    path = folder / "device.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---- help -------------------------------------------------------------------------------------


def test_top_level_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for name in ("broker", "edge", "models", "demo", "watch"):
        assert name in result.output
    assert "Usage" in result.output


def test_every_expected_command_exists() -> None:
    expected = {(), ("broker",), ("edge",), ("edge", "run"), ("models",), ("models", "demo"), ("demo",), ("watch",)}
    assert expected <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "edgewire")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if path:
        assert path[-1] in result.output


def test_edge_run_help_mentions_config() -> None:
    result = invoke("edge", "run", "--help")
    assert result.exit_code == 0
    assert "--config" in result.output


def test_edge_run_without_config_is_a_usage_error() -> None:
    result = invoke("edge", "run")
    assert result.exit_code == 2
    assert_says(result, "--config")


# ---- edge run with bad configurations ------------------------------------------------------


def test_edge_run_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = invoke("edge", "run", "--config", str(missing))
    assert result.exit_code == 2, result.output
    assert_says(result, "error:", "cannot read configuration", str(missing))
    assert "Traceback" not in result.output


def test_edge_run_config_with_unknown_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        device_id: cam-01
        source:
          kind: folder
          path: frames
        model:
          path: m.onnx
        judge:
          min_confidance: 0.5
        """,
    )
    result = invoke("edge", "run", "-c", str(path))
    assert result.exit_code == 2, result.output
    assert_says(result, f"{path}:8", "judge.min_confidance", "unknown key", "did you mean 'min_confidence'?")
    assert "Traceback" not in result.output


def test_edge_run_config_with_yaml_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "device_id: cam-01\nsource:\n  kind: folder\n   path: frames\n")
    result = invoke("edge", "run", "--config", str(path))
    assert result.exit_code == 2, result.output
    assert_says(result, f"{path}:4", "YAML syntax error")


def test_edge_run_config_with_missing_model(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        device_id: cam-01
        broker:
          url: mqtt://127.0.0.1:1
        source:
          kind: folder
          path: frames
        model:
          path: models/absent.onnx
        """,
    )
    result = invoke("edge", "run", "--config", str(path))
    assert result.exit_code == 2, result.output
    assert_says(result, "model file not found", str(tmp_path.resolve() / "models" / "absent.onnx"))
    assert "Traceback" not in result.output


def test_edge_run_config_with_unknown_profile(tmp_path: Path) -> None:
    path = write_config(tmp_path, "device_id: d\nprofile: toaster\nsource: {kind: mqtt}\nmodel: {path: m.onnx}\n")
    result = invoke("edge", "run", "--config", str(path))
    assert result.exit_code == 2, result.output
    assert_says(result, "unknown device profile 'toaster'", "x86-64-cpu")


@pytest.mark.parametrize("folder", ["[site-a]", "[/site-a]"])
def test_edge_run_error_keeps_brackets_in_paths(tmp_path: Path, folder: str) -> None:
    missing = tmp_path / folder / "device.yaml"
    result = invoke("edge", "run", "--config", str(missing))
    assert result.exit_code == 2, result.output
    assert_says(result, str(missing))


def test_watch_with_a_bad_broker_url_exits_2() -> None:
    result = invoke("watch", "--broker", "http://127.0.0.1:1883", "--count", "1")
    assert result.exit_code == 2, result.output
    assert_says(result, "error:", "expected mqtt://HOST[:PORT]")


def test_group_help_says_only_what_the_group_does() -> None:
    # `models` builds the demo's artefacts; it has nothing to inspect them with.
    result = invoke("models", "--help")
    assert result.exit_code == 0, result.output
    assert "Build" in result.output and "inspect" not in result.output
    assert set(COMMAND_PATHS) >= {("models", "demo")}
    assert not [p for p in COMMAND_PATHS if p[:1] == ("models",) and p[1:] not in ((), ("demo",))]


# ---- per-device budgets -------------------------------------------------------------------------

BRIDGE = ("bridge", "--triton", "grpc://127.0.0.1:1")


@pytest.mark.parametrize(
    ("args", "option", "bound"),
    [
        ((*BRIDGE, "--device-rate", "-1"), "--device-rate", "0.1"),
        ((*BRIDGE, "--device-rate", "nan"), "--device-rate", ""),  # the bound named depends on click's release
        ((*BRIDGE, "--device-burst", "0"), "--device-burst", "1"),
        ((*BRIDGE, "--device-burst", "2.5"), "--device-burst", "integer"),
        (("cloud", "--device-rate", "0"), "--device-rate", "0.1"),
        (("cloud", "--device-fetch-burst", "0"), "--device-fetch-burst", "4"),
        (("distributor", "--device-fetch-rate", "-2"), "--device-fetch-rate", "0.01"),
        (("distributor", "--device-fetch-rate", "1000"), "--device-fetch-rate", "16"),
        (("distributor", "--device-fetch-burst", "1"), "--device-fetch-burst", "4"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_a_budget_out_of_bounds_is_refused_naming_the_option_and_its_bound(
    args: tuple[str, ...], option: str, bound: str
) -> None:
    """Refused before anything starts: a budget no device could be served under (no burst, a
    fetch burst below the largest chunk) or that could never apply is a typo, not a setting."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert_says(result, f"Invalid value for '{option}'", bound)


@pytest.mark.parametrize(
    ("command", "variable", "option"),
    [
        (BRIDGE, "EDGEWIRE_BRIDGE_DEVICE_RATE", "--device-rate"),
        (BRIDGE, "EDGEWIRE_BRIDGE_DEVICE_BURST", "--device-burst"),
        (("distributor",), "EDGEWIRE_DISTRIBUTOR_DEVICE_FETCH_RATE", "--device-fetch-rate"),
        (("distributor",), "EDGEWIRE_DISTRIBUTOR_DEVICE_FETCH_BURST", "--device-fetch-burst"),
    ],
)
def test_a_budget_from_the_environment_is_checked_as_the_option_is(
    command: tuple[str, ...], variable: str, option: str
) -> None:
    result = runner.invoke(app, list(command), env={variable: "-1"})
    assert result.exit_code == 2, result.output
    assert_says(result, f"Invalid value for '{option}'", variable)


def test_the_budgets_help_says_what_a_device_past_its_budget_gets() -> None:
    bridge = invoke("bridge", "--help")
    assert_says(bridge, "--device-rate", "--device-burst", "rate limited")
    distributor = invoke("distributor", "--help")
    assert_says(distributor, "--device-fetch-rate", "--device-fetch-burst", "fetch_rate_limited")
    cloud = invoke("cloud", "--help")
    assert_says(cloud, "--device-rate", "--device-burst", "--device-fetch-rate", "--device-fetch-burst")


# ---- watch ----------------------------------------------------------------------------------


async def test_watch_json_prints_one_compact_object_a_line(mosquitto: Any) -> None:
    desired = envelopes.DesiredConfig(revision=7, config={"judge": {"min_confidence": 0.6}}, ts=time.time())
    # Retained, so all three are there when watch subscribes, whenever that is.
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="publisher") as c:
        await c.publish(topics.CONFIG_DESIRED.build(device_id="cam-1"), envelopes.encode(desired), qos=1, retain=True)
        await c.publish(topics.CONFIG_DESIRED.build(device_id="cam-2"), b"\x00garbage", qos=1, retain=True)
        await c.publish("not/edgewire", b"12345", qos=1, retain=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgewire.cli", "watch", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}",
        "--json", "--count", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    assert len(lines) == 3, stdout.decode()
    docs = {doc["topic"]: doc for doc in map(json.loads, lines)}
    assert all(isinstance(doc, dict) and set(doc) == {"topic", "kind", "payload"} for doc in docs.values())
    good = docs[topics.CONFIG_DESIRED.build(device_id="cam-1")]
    assert good["kind"] == "DesiredConfig" and good["payload"]["revision"] == 7
    assert docs[topics.CONFIG_DESIRED.build(device_id="cam-2")]["kind"] == "DesiredConfig (rejected)"
    assert docs["not/edgewire"] == {"topic": "not/edgewire", "kind": "unknown-topic", "payload": "5 bytes"}
