"""The ``edgewire`` command: its help, and clean exit-2 errors for bad device configurations."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner, Result

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
    """Output without whitespace: Rich wraps long lines (and paths) at the terminal width."""
    return "".join(text.split())


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
