"""One reader for a model's ``edgewire`` entry: the device's engine, the Triton repository writer
and the bridge reading Triton's config refuse the same broken entry with the same words."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from edgewire.cloud_bridge.model_repository import model_meta_from_config, write_python_repository
from edgewire.edge.engines.onnx import OnnxEngine
from edgewire.errors import ModelError
from edgewire.modelmeta import META_KEY, ModelMeta, onnx_model_meta, parse_model_meta

from .test_engine import tiny_meta, tiny_model

REMEDY = "edgewire.cloud_bridge.model_repository, which copies it into config.pbtxt"

# (raw entry, what the message must say is wrong); None is an entry that is not there at all.
BROKEN = {
    "not_json": ("{not json", f"the '{META_KEY}' entry is not JSON (Invalid JSON"),
    "wrong_fields": ('{"name": "tiny"}', f"the '{META_KEY}' entry is not a valid ModelMeta (version: Field required"),
    "wrong_value": (
        tiny_meta().model_dump_json().replace('"probabilities"', '"scores"'),
        "output_kind: Input should be 'probabilities' or 'logits'",
    ),
}


def _refusal(action: object) -> str:
    with pytest.raises(ModelError) as info:
        action()  # type: ignore[operator]
    return str(info.value)


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_three_readers_refuse_a_broken_entry_alike(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, what = BROKEN[case]  # (a missing entry is inferred on the device: tests/test_model_reading.py)
    path = tiny_model(tmp_path / "broken.onnx", raw_meta=raw)
    on_device = _refusal(lambda: OnnxEngine(path))
    by_repository = _refusal(lambda: write_python_repository(tmp_path / "repo", [path]))
    parameters = {} if raw is None else {META_KEY: {"string_value": raw}}
    from_triton = _refusal(lambda: model_meta_from_config({"name": "tiny", "parameters": parameters}))
    monkeypatch.setitem(sys.modules, "onnx", None)  # a bridge host with onnxruntime only
    by_repository_without_onnx = _refusal(lambda: write_python_repository(tmp_path / "repo", [path]))

    onnx_source = f"{path} (ONNX metadata): "
    assert on_device == by_repository == by_repository_without_onnx
    assert on_device.startswith(onnx_source)
    triton_source = "config.pbtxt of Triton model 'tiny': "
    assert from_triton.startswith(triton_source)
    assert from_triton.removeprefix(triton_source) == on_device.removeprefix(onnx_source)
    assert what in on_device
    assert on_device.endswith(REMEDY)
    assert not (tmp_path / "repo").exists()


def test_the_bridge_readers_refuse_a_model_without_its_entry_alike(tmp_path: Path) -> None:
    path = tiny_model(tmp_path / "plain.onnx")
    # The repository writer reads a file as the device does (exporter metadata and the graph),
    # so it refuses what the device refuses, in the same words and with the same fix.
    by_repository = _refusal(lambda: write_python_repository(tmp_path / "repo", [path]))
    assert by_repository == _refusal(lambda: OnnxEngine(path))
    assert "edgewire model annotate" in by_repository
    # A Triton model config is written by that writer, so it always carries the entry.
    missing = f"no '{META_KEY}' entry, so the model's input, labels and output are unknown"
    from_triton = _refusal(lambda: model_meta_from_config({"name": "tiny", "parameters": {}}))
    assert from_triton.startswith(f"config.pbtxt of Triton model 'tiny': {missing}")


def test_an_empty_entry_counts_as_missing() -> None:
    assert _refusal(lambda: parse_model_meta("", "m.onnx")) == _refusal(lambda: parse_model_meta(None, "m.onnx"))


def test_a_long_list_of_problems_is_cut_short() -> None:
    message = _refusal(lambda: parse_model_meta("{}", "m.onnx"))
    # name, version, labels, input, output are all required: three are named, the rest counted.
    assert "name: Field required; version: Field required; labels: Field required; and 2 more)" in message


def test_a_whole_entry_of_the_wrong_type_is_named_as_such() -> None:
    assert "(the whole entry: Input should be an object)" in _refusal(lambda: parse_model_meta("[]", "m.onnx"))


def test_a_valid_entry_reads_back_the_same_meta() -> None:
    meta = tiny_meta()
    assert onnx_model_meta({META_KEY: meta.model_dump_json(), "other": "x"}, "m.onnx") == meta
    assert isinstance(parse_model_meta(meta.model_dump_json(), "m.onnx"), ModelMeta)
