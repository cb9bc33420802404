"""The file and header decoders fuzzed by tests/test_fuzz_loaders.py (hypothesis) and
tests/fuzz_atheris.py (atheris, coverage-guided): each target takes any bytes and either
returns a valid result or raises the module's own clear error; any other exception is a crash.

The files are read from disk as the commands read them, so a target also covers what the bytes
are as text (not UTF-8, a BOM, NUL bytes) before YAML and validation see them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from edgewire.cloud_bridge.rules import RuleSet, load_rules
from edgewire.config import DeviceConfig, load_device_config
from edgewire.errors import ConfigError
from edgewire.fleet import flash
from edgewire.image_header import image_size

_SCRATCH = Path(tempfile.mkdtemp(prefix="edgewire-fuzz-"))


def _as_file(data: bytes, name: str) -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def device_config(data: bytes) -> DeviceConfig | None:
    """A device's config file: a DeviceConfig, or ConfigError naming the file."""
    try:
        return load_device_config(_as_file(data, "device.yaml"))
    except ConfigError as exc:
        assert "device.yaml" in str(exc)
        return None


def fleet_file(data: bytes) -> list[flash.Rendered] | None:
    """A fleet file, rendered as `edgewire flash --broker-out` renders it (in memory; nothing is
    written): every device's files and the broker's, or ConfigError naming the file (or the
    CA folder it names)."""
    path = _as_file(data, "fleet.yaml")
    try:
        ca = flash.load_ca(path)
        rendered = flash.render(path, ca=ca)
    except ConfigError as exc:
        assert "fleet.yaml" in str(exc) or "fleet-ca" in str(exc) or "certificate" in str(exc)
        return None
    assert rendered and all(r.files for r in rendered)
    try:
        rendered.append(flash.render_broker(path, ca=ca))
    except ConfigError as exc:
        assert "fleet.yaml" in str(exc) or "certificate" in str(exc)
    return rendered


def rule_file(data: bytes) -> RuleSet | None:
    """A bridge's routing rules: a RuleSet, or ConfigError naming the file."""
    try:
        return load_rules(_as_file(data, "rules.yaml"))
    except ConfigError as exc:
        assert "rules.yaml" in str(exc)
        return None


def image_header(data: bytes) -> tuple[int, int] | None:
    """An image's declared size: (width, height) within what the header can hold, or None."""
    size = image_size(data)
    assert size is None or (len(size) == 2 and all(0 <= v < 2**32 for v in size))
    return size


TARGETS: dict[str, Callable[[bytes], object]] = {
    "device_config": device_config,
    "fleet_file": fleet_file,
    "rule_file": rule_file,
    "image_header": image_header,
}
