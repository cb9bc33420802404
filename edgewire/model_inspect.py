"""What ``edgewire model inspect`` and ``edgewire model annotate`` do with a model file: a report
of what :func:`edgewire.modelmeta.read_model` made of it, and a copy of it with edgewire's entry
written in.

Reading stays in :mod:`edgewire.modelmeta`, the one reader a device's engine uses too, so what
inspect reports and what annotate writes are exactly what a device will load. This module adds
what only the operator's tools need: flags applied to an entry the model already has, and the
``onnx`` package to write an entry (a device never writes one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgewire.errors import ModelError
from edgewire.modelmeta import (
    META_KEY,
    GraphInfo,
    ModelMeta,
    ModelReading,
    Overrides,
    checked_reading,
    parse_model_meta,
    read_model,
    task_of_output,
    validation_problems,
)


def inspect_report(reading: ModelReading) -> dict[str, Any]:
    """``edgewire model inspect``'s answer as plain data (its ``--json``)."""
    meta = reading.meta
    g = reading.graph
    return {
        "file": reading.path,
        "inputs": [{"name": t.name, "shape": list(t.shape)} for t in g.inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape)} for t in g.outputs],
        "metadata_source": reading.source,
        "exporter_metadata": {k: v for k, v in g.metadata.items() if k != META_KEY},
        "task": meta.task if meta else None,
        "format": meta.detect.format if meta and meta.detect else None,
        "labels": list(meta.labels) if meta else None,
        "inferred": reading.inferred,
        "missing": reading.missing,
        "problems": reading.problems,
        "usable": meta is not None,
        "fill_command": None if meta is not None and reading.source == "edgewire" else reading.fill_command(),
        "meta": meta.model_dump(mode="json") if meta else None,
    }


def annotate_model(src: str | Path, dst: str | Path, overrides: Overrides | None = None) -> ModelReading:
    """Write ``src`` to ``dst`` with edgewire's entry, inferred as far as the file allows and
    completed by ``overrides`` (or, for a model that has an entry, that entry with ``overrides``
    applied); a ModelError names what is still missing or wrong."""
    graph = GraphInfo.from_file(src)
    if graph.metadata.get(META_KEY):
        reading = reannotated(src, graph, overrides or Overrides())
    else:
        reading = read_model(src, graph, overrides)
    write_model_meta(src, dst, reading.require())
    return reading


def reannotated(path: str | Path, graph: GraphInfo, overrides: Overrides) -> ModelReading:
    """A model's own entry with the operator's flags applied, checked against its graph as a
    device would check it (a detector once declared a classifier is fixed by ``--task detect``)."""
    path = str(path)
    meta = parse_model_meta(graph.metadata.get(META_KEY), f"{path} (ONNX metadata)")
    reading = ModelReading(path, graph, "edgewire", inferred={"everything": f"the '{META_KEY}' entry"})
    changes = {k: v for k, v in vars(overrides).items() if v is not None}
    if changes:
        try:
            meta = _rebuild(meta, changes, graph)
        except ValidationError as exc:
            reading.problems.append(validation_problems(exc))
            return reading
    return checked_reading(reading, meta, graph)


def _rebuild(meta: ModelMeta, changes: dict[str, Any], graph: GraphInfo) -> ModelMeta:
    data = meta.model_dump()
    inp = data["input"]
    for key in ("layout", "color", "resize", "scale", "mean", "std", "pad_value"):
        if key in changes:
            inp[key] = changes[key]
    if "input_size" in changes:
        h, w = changes["input_size"]
        b = inp["shape"][0]
        c = inp["shape"][1] if inp["layout"] == "NCHW" else inp["shape"][3]
        inp["shape"] = (b, c, h, w) if inp["layout"] == "NCHW" else (b, h, w, c)
    for key in ("name", "version", "task", "labels", "output"):
        if key in changes:
            data[key] = changes[key]
    if "format" in changes:
        data["detect"] = {**(data.get("detect") or {}), "format": changes["format"]}
    if data["task"] == "classify":
        data["detect"] = None
    elif data.get("detect") is None and (out := graph.output(data["output"])) is not None:
        # Declared a detector now: its format from the output's shape, as for a fresh model.
        hw = (inp["shape"][2], inp["shape"][3]) if inp["layout"] == "NCHW" else inp["shape"][1:3]
        seen = task_of_output(out, hw)
        if seen is not None and seen[1] is not None:
            data["detect"] = {"format": seen[1]}
    return ModelMeta.model_validate(data)


def write_model_meta(src: str | Path, dst: str | Path, meta: ModelMeta) -> None:
    """Copy the ONNX file ``src`` to ``dst`` with ``meta`` as its ``edgewire`` entry (other
    entries kept). Needs the ``onnx`` package (``pip install 'edgewire[models]'``)."""
    try:
        import onnx
    except ImportError:
        raise ModelError("writing model metadata needs the onnx package: pip install 'edgewire[models]'") from None
    from edgewire.durable import atomic_write

    model = onnx.load(str(src))
    kept = [p for p in model.metadata_props if p.key != META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.model_dump_json()
    atomic_write(Path(dst), model.SerializeToString())
