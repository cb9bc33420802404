"""What the demo leaves behind for a newcomer: a device configuration that runs after the demo has
stopped, and a summary that says what each figure is."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edgewire.config import load_device_config
from edgewire.demo.models import DemoArtifacts
from edgewire.demo.run import STANDALONE_BROKER, summary_text, write_standalone_config
from edgewire.edge.agent import EdgeAgent


def test_the_left_behind_config_loads_from_anywhere(
    demo: DemoArtifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `edgewire demo --out demo-data`, run from tmp_path: every path it knows is relative to the cwd.
    out = tmp_path / "demo-data"
    out.mkdir()
    (out / "models").symlink_to(demo.edge_model.parent, target_is_directory=True)
    (out / "frames").symlink_to(demo.frames_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    arts = DemoArtifacts(
        edge_model=Path("demo-data/models/digits-edge.onnx"),
        cloud_model=Path("demo-data/models/digits-cloud.onnx"),
        frames_dir=Path("demo-data/frames"),
        labels_file=Path("demo-data/frames/labels.json"),
        edge_accuracy=demo.edge_accuracy,
        cloud_accuracy=demo.cloud_accuracy,
    )
    write_standalone_config(arts, Path("demo-data/device.yaml"))
    text = (out / "device.yaml").read_text()
    # Paths inside are relative to the file, not to where the demo ran.
    assert "path: models/digits-edge.onnx" in text and "path: frames" in text
    assert "demo-data" not in text and "edgewire broker" in text

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_device_config(out / "device.yaml")
    assert cfg.model.path.resolve() == demo.edge_model.resolve() and cfg.model.path.is_file()
    assert cfg.source.path is not None and cfg.source.path.resolve() == demo.frames_dir.resolve()
    assert not cfg.source.loop
    # It names the default broker, the one `edgewire broker` starts, not the demo's own (gone).
    assert cfg.broker.url == STANDALONE_BROKER
    # The device builds from it: the model loads with its metadata (no broker is needed yet).
    assert EdgeAgent(cfg).meta.name == "digits-edge"


def test_the_summary_says_what_each_figure_is() -> None:
    result = {
        "frames": 1080,
        "escalated": 400,
        "escalation_rate": 0.37,
        "timeouts": 0,
        "accuracy_edge": 0.9,
        "accuracy_cloud_only": 0.98,
        "accuracy_joint": 0.97,
        "p50_ms_local": 2.0,
        "p99_ms_local": 9.0,
        "p50_ms_escalated": 30.0,
        "p99_ms_escalated": 90.0,
        "bytes_sent_up": 409600,
    }
    text = summary_text(result, Path("demo-data/device.yaml"))
    lines = text.splitlines()
    assert any(line.split()[:2] == ["edge", "only"] and "device's model alone" in line for line in lines)
    assert any(line.split()[:2] == ["cloud", "only"] and "every frame been sent" in line for line in lines)
    assert any(line.split()[:1] == ["joint"] and "escalated" in line for line in lines)
    assert "from capture to final answer" in text
    assert "answered on the device  2.0 / 9.0 ms" in text and "escalated to the cloud  30.0 / 90.0 ms" in text
    assert "`edgewire broker --allow-anonymous`" in text and "--config demo-data/device.yaml" in text
