"""Builds edgewire's flood limit for Mosquitto (``mosquitto_flood_limit.c`` beside this file)
and renders the lines that load it.

Mosquitto loads plugins as shared objects built against its headers, so the plugin ships as
source and is built where Mosquitto runs (``mosquitto-dev`` and ``libmosquitto-dev``, and a C
compiler): ``python -m edgewire.broker.mosquitto_plugin DIR`` writes DIR/mosquitto_flood_limit.so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from edgewire.errors import EdgewireError

SOURCE = Path(__file__).with_name("mosquitto_flood_limit.c")
LIBRARY = "mosquitto_flood_limit.so"
#: Where the rendered configuration expects the built plugin.
INSTALL_PATH = f"/usr/lib/edgewire/{LIBRARY}"
_NEEDS = "apt-get install gcc libc6-dev mosquitto-dev libmosquitto-dev"


class PluginBuildError(EdgewireError):
    """The plugin could not be built here."""


def build(out_dir: Path) -> Path:
    """Compile the plugin into ``out_dir`` (written whole or not at all); its path."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise PluginBuildError(f"no C compiler to build the Mosquitto flood limit: {_NEEDS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        built = Path(tmp) / LIBRARY
        cmd = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(built), str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PluginBuildError(
                f"building {SOURCE.name} failed ({_NEEDS} gives the headers):\n{done.stderr.strip()}"
            )
        built.replace(target)
    return target


def conf_lines(
    services: Iterable[str], *, plugin: str = INSTALL_PATH, rate: float | None = None, burst: int | None = None
) -> str:
    """mosquitto.conf lines that load the plugin; ``services`` (the fleet's users that are not
    devices) are never limited."""
    lines = [f"plugin {plugin}", f"plugin_opt_services {' '.join(sorted(services))}"]
    lines += [f"plugin_opt_rate {rate:g}"] if rate is not None else []
    lines += [f"plugin_opt_burst {burst}"] if burst is not None else []
    return "\n".join(lines) + "\n"


def fleet_conf(services: Iterable[str]) -> str:
    """What ``edgewire flash --broker-out`` renders as mosquitto-flood-limit.conf: how to build
    the plugin, and the lines that load it with the fleet's services (its users that are not
    devices) never limited."""
    head = (
        "# edgewire's flood limit: a device publishing past 1,000 a second (1,000 at once) is\n"
        "# disconnected and its logins refused for a cool-off (SECURITY.md). Build the plugin where\n"
        f"# Mosquitto runs: python -m edgewire.broker.mosquitto_plugin {Path(INSTALL_PATH).parent}\n"
        "# then append these lines to mosquitto.conf.\n"
    )
    return head + conf_lines(services)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m edgewire.broker.mosquitto_plugin DIR   (builds DIR/{LIBRARY})")
    try:
        print(build(Path(sys.argv[1])))
    except PluginBuildError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
