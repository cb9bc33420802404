"""`edgewire flash`: a fleet template rendered into per-device files, validated before writing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgewire.cli import app
from edgewire.config import load_device_config
from edgewire.errors import ConfigError
from edgewire.fleet.flash import DEVICE_CONFIG, SIGNING_KEY, UNIT, plan, render, write

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "firmware_configs" / "fleet.example.yaml"
GOLDEN = Path(__file__).parent / "golden" / "flash"


@pytest.mark.parametrize("device", ["dock-cam-01", "gate-xnx-01", "shelf-rpi-01"])
def test_three_kinds_of_device_match_their_golden_files(device: str, tmp_path: Path) -> None:
    rendered = {r.device_id: r for r in render(EXAMPLE)}
    files = rendered[device].files
    assert files[DEVICE_CONFIG] == (GOLDEN / f"{device}.yaml").read_bytes()
    assert files[UNIT] == (ROOT / "systemd" / "edgewire-edge.service").read_bytes()
    assert files[SIGNING_KEY].decode().startswith("MCowBQYDK2Vw")
    out = tmp_path / "device.yaml"
    out.write_bytes(files[DEVICE_CONFIG])
    assert load_device_config(out).device_id == device  # what a device loads at boot


def test_range_and_credentials_are_repeatable() -> None:
    first, second = render(EXAMPLE), render(EXAMPLE)
    ids = [r.device_id for r in first]
    assert ids[-4:] == ["line-cam-01", "line-cam-02", "line-cam-03", "line-cam-04"]
    assert [r.files for r in first] == [r.files for r in second]
    passwords = {yaml.safe_load(r.files[DEVICE_CONFIG])["broker"]["password"] for r in first}
    assert len(passwords) == len(first)  # one per device


def test_cli_writes_once_then_reports_nothing_changed_and_dry_run_diffs(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    first = runner.invoke(app, ["flash", "--fleet", str(EXAMPLE), "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "21 file(s) written for 7 device(s)" in first.output
    stamp = (out / "dock-cam-01" / DEVICE_CONFIG).stat().st_mtime_ns
    second = runner.invoke(app, ["flash", "--fleet", str(EXAMPLE), "--out", str(out)])
    assert "nothing changed" in second.output
    assert (out / "dock-cam-01" / DEVICE_CONFIG).stat().st_mtime_ns == stamp
    assert oct((out / "dock-cam-01" / DEVICE_CONFIG).stat().st_mode & 0o777) == "0o600"
    changed = tmp_path / "fleet.yaml"
    changed.write_text(EXAMPLE.read_text().replace("min_confidence: 0.8", "min_confidence: 0.85"))
    dry = runner.invoke(app, ["flash", "--fleet", str(changed), "--out", str(out), "--dry-run"])
    assert dry.exit_code == 0
    assert "-  min_confidence: 0.8\n+  min_confidence: 0.85" in dry.output
    assert "1 file(s) of 7 device(s) would change" in dry.output
    assert b"0.85" not in (out / "gate-xnx-01" / DEVICE_CONFIG).read_bytes()


def test_target_rootfs_takes_one_device(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["flash", "--fleet", str(EXAMPLE), "--target", str(tmp_path), "--devices", "shelf-*"])
    assert ok.exit_code == 0, ok.output
    assert yaml.safe_load((tmp_path / DEVICE_CONFIG).read_text())["device_id"] == "shelf-rpi-01"
    many = runner.invoke(app, ["flash", "--fleet", str(EXAMPLE), "--target", str(tmp_path), "--devices", "line-*"])
    assert many.exit_code == 2 and "4 match" in many.output


def test_two_hundred_devices_render_and_validate(tmp_path: Path) -> None:
    fleet = yaml.safe_load(EXAMPLE.read_text())
    fleet["devices"] = [{"range": {"prefix": "cam-", "start": 1, "stop": 200}}]
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(fleet))
    rendered = render(path)
    assert len(rendered) == 200 and rendered[-1].device_id == "cam-200"
    changes = list(plan(rendered, tmp_path / "out"))
    write(changes)
    assert len(changes) == 600
    assert len(list((tmp_path / "out").glob("cam-*/etc/edgewire/device.yaml"))) == 200


BROKEN = {
    "unknown key": (("broker:", "brokr: {}\nbroker:"), "brokr", "unknown key"),
    "unknown profile": (("profile: raspberry-pi-5", "profile: raspberry-pi-9"), "raspberry-pi-9", "use one of"),
    "duplicate id": (("- id: gate-xnx-01", "- id: dock-cam-01"), "already used by devices[0]", "own id"),
    "bad broker url": (("url: mqtt://broker.lab.example:1883", "url: http://nope"), "broker.url", "mqtt://HOST"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_fleet_files_are_refused_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    (old, new), what, fix = BROKEN[case]
    path = tmp_path / "fleet.yaml"
    text = EXAMPLE.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        render(path)
    message = str(info.value)
    assert f"{path}:" in message and what in message and fix in message
    result = CliRunner().invoke(app, ["flash", "--fleet", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()
