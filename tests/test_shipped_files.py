"""The configuration files we ship must load, so an operator's first edit starts from a valid one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgewire.config import load_device_config
from edgewire.profiles import available_profiles, load_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "firmware_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_device_configs_validate(path: Path) -> None:
    cfg = load_device_config(path)
    assert cfg.profile in available_profiles()
    load_profile(cfg.profile)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", sorted((ROOT / "systemd").glob("*.service")), ids=lambda p: p.name)
def test_systemd_units_parse(unit: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in out.stderr.splitlines() if unit.name in line and "Command" not in line]
    assert not problems, out.stderr
