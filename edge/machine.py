"""What the device's machine is doing, for telemetry: CPU, memory, disk, temperature, and on a
Jetson GPU load, power and memory-controller load.

Read from /proc and /sys on any Linux; on a Jetson from ``jtop`` when it is installed, else from a
``tegrastats`` process (parsed by :mod:`.tegrastats`). A figure that cannot be read is left out,
never reported as zero: a monitor shows "-" rather than a made-up "0 %".
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

from .tegrastats import parse

log = logging.getLogger(__name__)


class Machine:
    """Samples the machine each time telemetry is sent; CPU is busy time since the last sample."""

    def __init__(self, data_path: Path | None = None, *, proc: Path = Path("/proc"), sys: Path = Path("/sys")) -> None:
        self.data_path = data_path or Path.cwd()
        self.proc, self.sys = proc, sys
        self._cpu_before: tuple[int, int] | None = self._cpu_times()
        self._tegra = TegrastatsReader.start() if shutil.which("tegrastats") else None

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        cpu = self._cpu_percent()
        if cpu is not None:
            out["cpu_percent"] = cpu
        mem = self._memory_percent()
        if mem is not None:
            out["memory_used_percent"] = mem
        with contextlib.suppress(OSError):
            st = os.statvfs(self.data_path)
            if st.f_blocks:
                out["disk_used_percent"] = 100.0 * (st.f_blocks - st.f_bfree) / st.f_blocks
        temp = self._temperature()
        if temp is not None:
            out["temperature_c"] = temp
        jetson = jtop_sample() or (self._tegra.latest() if self._tegra is not None else {})
        for key in ("gpu_load_percent", "power_mw", "emc_load_percent", "temperature_c"):
            if key in jetson:
                out[key] = jetson[key]
        return out

    def close(self) -> None:
        if self._tegra is not None:
            self._tegra.stop()

    def _cpu_times(self) -> tuple[int, int] | None:
        try:
            fields = (self.proc / "stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        values = [int(v) for v in fields[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    def _cpu_percent(self) -> float | None:
        now, before = self._cpu_times(), self._cpu_before
        self._cpu_before = now
        if now is None or before is None or now[0] <= before[0]:
            return None
        total, idle = now[0] - before[0], now[1] - before[1]
        return 100.0 * (total - idle) / total

    def _memory_percent(self) -> float | None:
        try:
            info = dict(line.split(":", 1) for line in (self.proc / "meminfo").read_text().splitlines() if ":" in line)
            total = int(info["MemTotal"].split()[0])
            available = int(info["MemAvailable"].split()[0])
        except (OSError, KeyError, ValueError):
            return None
        return 100.0 * (total - available) / total if total > 0 else None

    def _temperature(self) -> float | None:
        temps = []
        for path in glob.glob(str(self.sys / "class" / "thermal" / "thermal_zone*" / "temp")):
            with contextlib.suppress(OSError, ValueError):
                milli = int(Path(path).read_text().strip())
                if -40_000 < milli < 150_000:  # a disabled zone reads -256000 or garbage
                    temps.append(milli / 1000.0)
        return max(temps) if temps else None


def jtop_sample() -> dict[str, float]:
    """GPU, power and EMC from jtop (jetson-stats) when it is installed and its service runs."""
    try:
        from jtop import jtop  # type: ignore[import-not-found]
    except ImportError:
        return {}
    out: dict[str, float] = {}
    try:
        with jtop() as jetson:
            stats = jetson.stats
            if "GPU" in stats:
                out["gpu_load_percent"] = float(stats["GPU"])
            power = jetson.power.get("tot", {}) if isinstance(jetson.power, dict) else {}
            if "power" in power:
                out["power_mw"] = float(power["power"])
            emc = jetson.memory.get("EMC", {}) if isinstance(jetson.memory, dict) else {}
            if "val" in emc:
                out["emc_load_percent"] = float(emc["val"])
    except Exception as exc:  # jtop's service not running, or an API it does not have
        log.debug("jtop unavailable: %s", exc)
    return out


class TegrastatsReader:
    """A ``tegrastats`` process whose latest line is kept parsed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._latest: dict[str, float] = {}
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, interval_ms: int = 1000) -> TegrastatsReader | None:
        try:
            proc = subprocess.Popen(
                ["tegrastats", "--interval", str(interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True,
            )  # fmt: skip
        except OSError:
            return None
        return cls(proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._latest = parse(line)

    def latest(self) -> dict[str, float]:
        return dict(self._latest)

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)
