"""The device's state documents: one TinyDB file that a crash never tears, and what it keeps."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgewire.edge.state import DeviceState

_WRITER = """
import sys
from pathlib import Path
from edgewire.edge.state import DeviceState
state = DeviceState(Path(sys.argv[1]))
n = int(sys.argv[2])
padding = "x" * 4096  # big enough that a torn write would show
print("ready", flush=True)
while True:
    n += 1
    state.save_desired({"fleet": {"n": n, "pad": padding}, "device": {"n": n}})
    state.save_model("digits", {"active": str(n), "history": [str(n - 1)], "installed": [], "failed": {}})
"""


def _generation(path: Path) -> int:
    """The generation a file holds; fails the test if it is not one whole, consistent document."""
    data = json.loads(path.read_bytes())  # a torn file would not parse
    desired = next(iter(data["desired"].values()))
    assert desired["fleet"]["n"] == desired["device"]["n"]
    return int(desired["fleet"]["n"])


def test_sigkill_mid_write_leaves_the_old_document_or_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "device.state.json"
    DeviceState(path).save_desired({"fleet": {"n": 0}, "device": {"n": 0}})
    rng = random.Random(12)
    last = 0
    kills = 40
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(last)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        now = _generation(path)
        assert now >= last  # never goes back: a finished rename is on disk
        last = now
        again = DeviceState(path)
        assert again.desired()["device"]["n"] == now
        model = again.model("digits")
        # Each record whole, of a generation no newer than the desired document written before it.
        if model is not None:
            assert int(model["history"][0]) == int(model["active"]) - 1 and int(model["active"]) <= now
    assert last > 0  # the writer did get some writes done between kills
    # Temporary files of killed writers are the only leftovers; none is mistaken for the state.
    assert all(p == path or p.name.startswith(f".{path.name}.tmp-") for p in tmp_path.iterdir())


def test_documents_survive_a_restart_and_models_are_kept_apart(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = DeviceState(path)
    assert state.desired() == {"fleet": {}, "device": {}}
    state.save_desired({"fleet": {"judge": {"min_confidence": 0.5}}, "device": {}})
    state.save_model("digits", {"active": "2", "failed": {"3": "validation: bad shape"}})
    state.save_model("faces", {"active": "1"})
    state.save_model("digits", {"active": "4", "failed": {"3": "validation: bad shape"}})
    again = DeviceState(path)
    assert again.desired()["fleet"] == {"judge": {"min_confidence": 0.5}}
    assert again.model("digits") == {"active": "4", "failed": {"3": "validation: bad shape"}}
    assert again.model("faces") == {"active": "1"}
    again.forget_model("faces")
    assert DeviceState(path).model("faces") is None


def test_in_memory_state_keeps_nothing_on_disk(tmp_path: Path) -> None:
    state = DeviceState(None)
    state.save_model("digits", {"active": "1"})
    assert state.model("digits") == {"active": "1"} and state.where == "<memory>"
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_state_file_is_set_aside_with_its_name_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"desired": {"1": ')
    with caplog.at_level(logging.WARNING):
        state = DeviceState(path)
    assert str(path) in caplog.text and "unreadable" in caplog.text
    assert state.desired() == {"fleet": {}, "device": {}}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.unreadable-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b'{"desired": {"1": '
    state.save_model("digits", {"active": "1"})
    assert DeviceState(path).model("digits") == {"active": "1"}
