"""The configuration files we ship must load, so an operator's first edit starts from a valid one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgewire.config import load_device_config
from edgewire.profiles import available_profiles, load_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "firmware_configs").glob("device*.yaml")), ids=lambda p: p.name)
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


@pytest.mark.parametrize("name", available_profiles())
def test_shipped_profiles_describe_their_hardware(name: str) -> None:
    profile = load_profile(name)
    assert profile.hardware is not None
    assert 0 < profile.onnxruntime.intra_op_threads <= profile.hardware.cpu_cores
    assert profile.limits.memory_limit_mb < profile.hardware.memory_mb
    text = (ROOT / "device_profiles" / f"{name}.yaml").read_text()
    assert "Source:" in text or name == "x86-64-cpu"  # where the numbers come from
    if "tensorrt" in profile.backends:
        assert profile.hardware.gpu and "NVIDIA" in profile.hardware.gpu
