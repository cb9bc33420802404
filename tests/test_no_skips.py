"""CI's switch that allows no skip: a test or a module that would skip for something missing
fails instead, naming it; without the switch a skip stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

SKIPPING = """
import pytest

def test_needs_a_tool() -> None:
    pytest.skip("frobnicator is not installed")

def test_runs() -> None:
    assert True
"""
SKIPPING_MODULE = """
import pytest
pytest.importorskip("a_module_that_is_not_there")

def test_never_runs() -> None:
    assert True
"""


PYTEST = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-rfEs", "-p", "no:cacheprovider"]


def _run(tmp_path: Path, no_skips: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_skipping_module.py").write_text(SKIPPING_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "EDGEWIRE_NO_SKIPS"}
    if no_skips:
        env["EDGEWIRE_NO_SKIPS"] = "1"
    return subprocess.run(
        [*PYTEST, "--continue-on-collection-errors", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_with_the_switch_every_skip_fails_and_names_what_is_missing(tmp_path: Path) -> None:
    done = _run(tmp_path, no_skips=True)
    assert done.returncode != 0, done.stdout
    assert "frobnicator is not installed" in done.stdout
    assert "a_module_that_is_not_there" in done.stdout
    assert "1 passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


def test_without_it_a_skip_stays_a_skip(tmp_path: Path) -> None:
    done = _run(tmp_path, no_skips=False)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout.splitlines()[-1]
