"""One ``tegrastats`` line to the figures a Jetson's telemetry carries.

The line changed across JetPack releases: 4.x prints power rails as ``POM_5V_IN 2000/2000``
(milliwatts without a unit) and ``GR3D_FREQ 0%``; 5.x and 6.x print ``VDD_IN 4840mW/4840mW``,
``GR3D_FREQ 0%@[305]`` or ``GR3D_FREQ 0%@305``, may lead with a date, and drop ``EMC_FREQ`` on
some boards. Only what the line says is returned: a figure the line lacks is absent, and so is a
sensor that reads -256C (switched off) or the Nano's fixed PMIC@100C.
"""

from __future__ import annotations

import re

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?\b")
#: Rails that measure the whole board's input, by module family.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")
#: Sensors that do not measure a temperature (the Nano's PMIC always says 100C).
FAKE_SENSORS = frozenset({"PMIC"})


def parse(line: str) -> dict[str, float]:
    """Figures from one line: ``cpu_percent`` (mean over online cores), ``memory_used_percent``,
    ``gpu_load_percent``, ``emc_load_percent``, ``temperature_c`` (hottest real sensor) and
    ``power_mw`` (board input, now)."""
    out: dict[str, float] = {}
    if m := _RAM.search(line):
        used, total = int(m.group(1)), int(m.group(2))
        if total > 0:
            out["memory_used_percent"] = 100.0 * used / total
    if m := _CPU.search(line):
        loads = [int(c.split("%", 1)[0]) for c in m.group(1).split(",") if "%" in c]
        if loads:
            out["cpu_percent"] = sum(loads) / len(loads)
    if m := _GR3D.search(line):
        out["gpu_load_percent"] = float(m.group(1))
    if m := _EMC.search(line):
        out["emc_load_percent"] = float(m.group(1))
    temps = [float(v) for name, v in _TEMP.findall(line) if name.upper() not in FAKE_SENSORS and float(v) > -200]
    if temps:
        out["temperature_c"] = max(temps)
    rails = {name: float(now) for name, now, _avg in _RAIL.findall(line)}
    for rail in INPUT_RAILS:
        if rail in rails:
            out["power_mw"] = rails[rail]
            break
    return out
