"""Machine figures for telemetry: tegrastats lines of several JetPack releases, and /proc + /sys
read as they are (a figure that cannot be read is absent)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgewire.edge.machine import Machine
from edgewire.edge.tegrastats import parse

# Recorded shapes of one tegrastats line per release (values from real boards' output).
JETPACK_4_6_NANO = (
    "RAM 2448/3964MB (lfb 2x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [12%@1479,8%@1479,off,off] EMC_FREQ 3% GR3D_FREQ 41% PLL@24C CPU@26.5C PMIC@100C GPU@25C "
    "AO@33C thermal@25.75C POM_5V_IN 2000/2000 POM_5V_GPU 0/0 POM_5V_CPU 337/337"
)
JETPACK_4_6_XAVIER = (
    "RAM 3452/7765MB (lfb 918x4MB) SWAP 0/3883MB (cached 0MB) CPU [5%@1190,1%@1190,0%@1190,2%@1190,"
    "off,off] EMC_FREQ 1%@1600 GR3D_FREQ 0%@114 APE 150 MTS fg 0% bg 0% AO@31C GPU@31C PMIC@50C AUX@30.5C "
    "CPU@32.5C thermal@31.4C VDD_IN 4154/4154 VDD_CPU_GPU_CV 488/488 VDD_SOC 1302/1302"
)
JETPACK_5_1_ORIN_NANO = (
    "11-30-2026 05:00:00 RAM 2303/7620MB (lfb 1079x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@1510,0%@1510,3%@1510,0%@1510,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 12%@[305] VIC_FREQ 115 "
    "APE 200 CV0@-256C CPU@44.312C SOC2@42.25C SOC0@42.437C CV1@-256C GPU@-256C tj@44.312C SOC1@42.5C "
    "CV2@-256C VDD_IN 4840mW/4840mW VDD_CPU_GPU_CV 521mW/521mW VDD_SOC 1443mW/1443mW"
)
JETPACK_6_0_ORIN = (
    "11-30-2026 05:00:01 RAM 3210/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [3%@729,2%@729,1%@729,0%@729,0%@729,0%@729] GR3D_FREQ 0% cpu@45.5C soc2@43.906C "
    "soc0@44.125C gpu@43.968C tj@45.5C soc1@44.343C VDD_IN 5012mW/5012mW VDD_CPU_GPU_CV 604mW/604mW "
    "VDD_SOC 1524mW/1524mW"
)


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (
            JETPACK_4_6_NANO,
            {"memory_used_percent": 100 * 2448 / 3964, "cpu_percent": 10.0, "gpu_load_percent": 41.0,
             "emc_load_percent": 3.0, "temperature_c": 33.0, "power_mw": 2000.0},
        ),
        (
            JETPACK_4_6_XAVIER,
            {"memory_used_percent": 100 * 3452 / 7765, "cpu_percent": 2.0, "gpu_load_percent": 0.0,
             "emc_load_percent": 1.0, "temperature_c": 32.5, "power_mw": 4154.0},
        ),
        (
            JETPACK_5_1_ORIN_NANO,
            {"memory_used_percent": 100 * 2303 / 7620, "cpu_percent": 1.0, "gpu_load_percent": 12.0,
             "emc_load_percent": 0.0, "temperature_c": 44.312, "power_mw": 4840.0},
        ),
        (
            # No EMC_FREQ on this board's line: absent, not zero.
            JETPACK_6_0_ORIN,
            {"memory_used_percent": 100 * 3210 / 7620, "cpu_percent": 1.0, "gpu_load_percent": 0.0,
             "temperature_c": 45.5, "power_mw": 5012.0},
        ),
    ],
    ids=["jetpack-4.6-nano", "jetpack-4.6-xavier", "jetpack-5.1-orin-nano", "jetpack-6.0-orin"],
)  # fmt: skip
def test_tegrastats_lines_of_each_jetpack(line: str, want: dict[str, float]) -> None:
    got = parse(line)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_a_line_without_figures_gives_none() -> None:
    assert parse("tegrastats: no such file") == {}
    assert "temperature_c" not in parse("RAM 1/2MB CV0@-256C GPU@-256C PMIC@100C")


def test_machine_reads_proc_and_sys_and_leaves_out_what_it_cannot(tmp_path: Path) -> None:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    (proc / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    (proc / "meminfo").write_text("MemTotal:  1000 kB\nMemFree: 100 kB\nMemAvailable:  250 kB\n")
    zones = sys / "class" / "thermal"
    for i, milli in enumerate(("41500", "-256000", "38000")):
        (zones / f"thermal_zone{i}").mkdir(parents=True)
        (zones / f"thermal_zone{i}" / "temp").write_text(milli + "\n")
    machine = Machine(tmp_path, proc=proc, sys=sys)
    first = machine.sample()
    assert "cpu_percent" not in first  # no time has passed on this /proc/stat: no rate, not 0
    (proc / "stat").write_text("cpu  250 0 150 900 100 0 0 0 0 0\n")
    got = machine.sample()
    assert got["cpu_percent"] == pytest.approx(100 * 200 / 400)
    assert got["memory_used_percent"] == pytest.approx(75.0)
    assert got["temperature_c"] == pytest.approx(41.5)
    assert 0 < got["disk_used_percent"] <= 100

    bare = Machine(tmp_path, proc=tmp_path / "none", sys=tmp_path / "none")
    assert set(bare.sample()) == {"disk_used_percent"}


def test_this_machine_reports_cpu_and_memory() -> None:
    machine = Machine()
    time.sleep(0.2)
    got = machine.sample()
    assert 0 <= got["cpu_percent"] <= 100 and 0 < got["memory_used_percent"] < 100
