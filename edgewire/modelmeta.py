"""What a model declares about itself, so devices need no per-model code.

Every model edgewire serves has a contract, :class:`ModelMeta`: task (``classify`` or
``detect``), labels, how a frame becomes its input, which output to read and, for a detector, the
output's format (:mod:`edgewire.detection`). It is stored as JSON under the ONNX metadata entry
``edgewire``.

A model can arrive without that entry. :func:`read_model` then reads what its exporter wrote
(Ultralytics: ``names``, ``imgsz``, ``stride``, ``task``) and what its graph shows (input layout,
channels and size; task and format from the output's shape), and returns a :class:`ModelReading`:
the contract when nothing is missing, else the exact missing fields and the
``edgewire model annotate`` command that fills them. The same reading checks a declared contract
against the graph (:func:`output_problem`), so a detector declared as a classifier is refused
when it loads, never on a frame. The device's engine, ``edgewire model inspect`` and
``edgewire model annotate`` all read models through it.

The bridge reads a served model's entry (Triton's ``config.pbtxt``, the repository writer)
through :func:`parse_model_meta` (:func:`onnx_model_meta` for an ONNX file's metadata), which
requires the entry, so an operator sees one wording for one fault wherever it is found.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgewire.detection import FORMAT_SHAPES, LETTERBOX_PAD, OutputFormat, class_count, recognise_format
from edgewire.errors import ModelError

Task = Literal["classify", "detect"]

META_KEY = "edgewire"

# Every refusal ends with the same remedy: the entry is only ever written by an export step
# and copied from there, so fixing the export (or regenerating what was copied) is the fix.
_HOW_TO_FIX = (
    f"it must hold ModelMeta JSON (see edgewire.modelmeta): store meta.model_dump_json() under "
    f"'{META_KEY}' in the ONNX file's metadata when exporting (onnx.helper.set_model_props), and "
    "write Triton repositories with edgewire.cloud_bridge.model_repository, which copies it into config.pbtxt"
)
# Enough of pydantic's list to see what is wrong, short enough to read in a log line.
_MAX_PROBLEMS = 3


class InputSpec(BaseModel):
    """How a decoded frame becomes the model's input tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="input tensor name in the graph")
    # Batch dimension first, written as -1 when dynamic.
    shape: tuple[int, int, int, int]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["gray", "bgr", "rgb"] = "gray"
    resize: Literal["stretch", "center_crop", "letterbox"] = "stretch"
    # value = (pixel * scale - mean) / std, per channel.
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: Literal["float32"] = "float32"
    #: Gray level of the border a letterbox adds (Ultralytics trains on 114).
    pad_value: int = Field(0, ge=0, le=255)

    @property
    def height(self) -> int:
        return self.shape[2] if self.layout == "NCHW" else self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[3] if self.layout == "NCHW" else self.shape[2]

    @property
    def channels(self) -> int:
        return self.shape[1] if self.layout == "NCHW" else self.shape[3]

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values (one per channel)")
        return self

    @field_validator("std")
    @classmethod
    def _no_zero_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s == 0 for s in v):
            raise ValueError("std must not contain 0")
        return v


class DetectSpec(BaseModel):
    """How a detector's output reads (see edgewire.detection for the formats)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: OutputFormat
    #: The network's largest stride; inputs are multiples of it.
    stride: int = Field(32, ge=1)


class ModelMeta(BaseModel):
    """Identity, labels, input and output contract of one model artefact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    task: Task = "classify"
    labels: tuple[str, ...]
    input: InputSpec
    output: str = Field(description="output tensor name in the graph")
    output_kind: Literal["probabilities", "logits"] = "probabilities"
    #: Required for ``task: detect``, absent for ``classify``.
    detect: DetectSpec | None = None

    @field_validator("task", mode="before")
    @classmethod
    def _old_task_name(cls, v: object) -> object:
        # Entries written before detection existed say "classification".
        return "classify" if v == "classification" else v

    @model_validator(mode="after")
    def _detect_needs_format(self) -> ModelMeta:
        if self.task == "detect" and self.detect is None:
            raise ValueError("task 'detect' needs 'detect' (its output format)")
        if self.task == "classify" and self.detect is not None:
            raise ValueError("'detect' is only for task 'detect'")
        return self


def parse_model_meta(raw: str | None, source: str) -> ModelMeta:
    """The model's contract from the text of its ``edgewire`` entry, or a :class:`ModelError`.

    ``source`` says where the entry was looked for, naming the file (``models/a.onnx (ONNX
    metadata)``, ``config.pbtxt of Triton model 'a'``); it starts every message. An absent or
    empty entry, text that is not JSON and JSON that is not a ModelMeta each get their own
    message, all ending in the same remedy.
    """
    if not raw:
        raise ModelError(
            f"{source}: no '{META_KEY}' entry, so the model's input, labels and output are unknown; {_HOW_TO_FIX}"
        )
    try:
        return ModelMeta.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["type"] == "json_invalid":
            raise ModelError(
                f"{source}: the '{META_KEY}' entry is not JSON ({errors[0]['msg']}); {_HOW_TO_FIX}"
            ) from exc
        problems = [f"{'.'.join(map(str, e['loc'])) or 'the whole entry'}: {e['msg']}" for e in errors]
        if len(problems) > _MAX_PROBLEMS:
            problems[_MAX_PROBLEMS:] = [f"and {len(problems) - _MAX_PROBLEMS} more"]
        raise ModelError(
            f"{source}: the '{META_KEY}' entry is not a valid ModelMeta ({'; '.join(problems)}); {_HOW_TO_FIX}"
        ) from exc


def onnx_model_meta(metadata: Mapping[str, str], path: str | Path) -> ModelMeta:
    """The contract in an ONNX file's metadata, as onnxruntime's ``custom_metadata_map`` or the
    onnx package's ``metadata_props`` give it, so the device and the repository writer refuse a
    broken file with the same words."""
    return parse_model_meta(metadata.get(META_KEY), f"{path} (ONNX metadata)")


# ---- reading a model as it arrives --------------------------------------------------------

#: A graph dimension: an int, or None where the graph leaves it open (a name or -1).
Dim = int | None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[Dim, ...]

    def shape_text(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class GraphInfo:
    """What a model file says about itself: its tensors and its metadata entries."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata: Mapping[str, str]

    @staticmethod
    def from_session(session: Any) -> GraphInfo:
        """From an ``onnxruntime.InferenceSession`` (the device has one already)."""

        def tensors(items: Any) -> tuple[TensorInfo, ...]:
            return tuple(
                TensorInfo(t.name, tuple(d if isinstance(d, int) and d > 0 else None for d in t.shape)) for t in items
            )

        return GraphInfo(
            tensors(session.get_inputs()),
            tensors(session.get_outputs()),
            dict(session.get_modelmeta().custom_metadata_map),
        )

    @staticmethod
    def from_file(path: str | Path) -> GraphInfo:
        """From an ONNX file, through onnxruntime (which refuses a file that is no model)."""
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        return GraphInfo.from_session(session)

    def output(self, name: str) -> TensorInfo | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class Overrides:
    """What an operator states about a model (``edgewire model annotate`` flags); None: infer it."""

    name: str | None = None
    version: str | None = None
    task: Task | None = None
    format: OutputFormat | None = None
    labels: tuple[str, ...] | None = None
    input_size: tuple[int, int] | None = None  # height, width
    layout: Literal["NCHW", "NHWC"] | None = None
    color: Literal["gray", "bgr", "rgb"] | None = None
    resize: Literal["stretch", "center_crop", "letterbox"] | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pad_value: int | None = None
    output: str | None = None


#: A missing field and the ``edgewire model annotate`` flag that fills it.
FILL_FLAGS: dict[str, str] = {
    "task": "--task classify|detect",
    "labels": "--labels LABELS.txt",
    "input size": "--input-size HxW",
    "color": "--color rgb|bgr",
    "output format": "--format yolov5|yolov8|end2end|probmap",
}


@dataclass
class ModelReading:
    """What edgewire makes of a model file: its contract, where each part came from, and what
    nothing in the file says (``missing``, named as ``FILL_FLAGS`` keys) or what contradicts the
    graph (``problems``). ``meta`` is None unless nothing is missing and nothing is wrong."""

    path: str
    graph: GraphInfo
    source: Literal["edgewire", "exporter", "graph"]
    meta: ModelMeta | None = None
    #: field -> where its value came from ("graph", "exporter metadata 'names'", "default", ...).
    inferred: dict[str, str] = dataclass_field(default_factory=dict)
    missing: list[str] = dataclass_field(default_factory=list)
    problems: list[str] = dataclass_field(default_factory=list)
    #: Flags the fix needs beyond the missing fields (``--task detect`` for a detector declared
    #: as a classifier).
    fix_flags: list[str] = dataclass_field(default_factory=list)

    def fill_command(self) -> str:
        """The command that writes the entry, with a flag for each missing field."""
        path = Path(self.path)
        out = path.with_name(f"{path.stem}.edgewire{path.suffix}")
        flags = "".join(f" {FILL_FLAGS[m]}" for m in self.missing) + "".join(f" {f}" for f in self.fix_flags)
        return f"edgewire model annotate {path} --out {out}{flags}"

    def refusal(self) -> str:
        """One message naming every missing field or problem and the command that fixes it."""
        parts = []
        if self.missing:
            parts.append(f"nothing in the model says its {', '.join(self.missing)}")
        parts += self.problems
        return f"{self.path}: {'; '.join(parts)}; fix: {self.fill_command()}"

    def require(self) -> ModelMeta:
        if self.meta is None:
            raise ModelError(self.refusal())
        return self.meta


def _literal(text: str | None) -> Any:
    """An exporter's Python-literal metadata value (Ultralytics writes ``str(dict)``), or None."""
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def _exporter_labels(metadata: Mapping[str, str]) -> tuple[str, ...] | None:
    names = _literal(metadata.get("names"))
    if isinstance(names, dict) and names and all(isinstance(k, int) for k in names):
        return tuple(str(names.get(i, f"class{i}")) for i in range(max(names) + 1))
    if isinstance(names, list | tuple) and names:
        return tuple(str(n) for n in names)
    return None


def _exporter_size(metadata: Mapping[str, str]) -> tuple[int, int] | None:
    size = _literal(metadata.get("imgsz"))
    if isinstance(size, int):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    return None


def task_of_output(output: TensorInfo, input_hw: tuple[Dim, Dim]) -> tuple[Task, OutputFormat | None] | None:
    """The task (and a detector's format) an output's shape shows, or None when it shows neither."""
    if len(output.shape) == 2:
        return "classify", None
    fmt = recognise_format(output.shape, input_hw)
    return ("detect", fmt) if fmt is not None else None


def fits_format(fmt: OutputFormat, shape: tuple[Dim, ...]) -> bool:
    """Whether an output of ``shape`` can be read as ``fmt`` (declared formats are taken as
    declared where the shape allows it: ``[B, N, 6]`` fits both yolov5 and end2end)."""
    if fmt == "probmap":
        return len(shape) == 4 and shape[1] == 1
    if len(shape) != 3:
        return False
    if fmt == "end2end":
        return shape[2] == 6
    if fmt == "yolov5":
        return shape[2] is None or shape[2] >= 6
    return shape[1] is None or shape[1] >= 5


def expected_output(meta: ModelMeta) -> str:
    if meta.task == "classify":
        return f"[B, {len(meta.labels)}] (one score per label)"
    assert meta.detect is not None
    return FORMAT_SHAPES[meta.detect.format]


def output_problem(meta: ModelMeta, graph: GraphInfo) -> str | None:
    """Why the graph's outputs do not fit what ``meta`` declares, or None: checked when a model
    loads, so a mismatch is refused there and never reaches a frame."""
    out = graph.output(meta.output)
    if out is None:
        return f"metadata names output '{meta.output}', graph has {[o.name for o in graph.outputs]}"
    inp = next((t for t in graph.inputs if t.name == meta.input.name), None)
    if inp is None:
        return f"metadata names input '{meta.input.name}', graph has {[i.name for i in graph.inputs]}"
    shape = out.shape
    declared = f"a {meta.task} model" + (f" with output format {meta.detect.format}" if meta.detect else "")
    fits = True
    if meta.task == "classify":
        fits = len(shape) == 2 and (shape[1] is None or shape[1] == len(meta.labels))
    else:
        assert meta.detect is not None
        fits = fits_format(meta.detect.format, shape)
        count = class_count(meta.detect.format, shape) if fits else None
        if count is not None and meta.detect.format != "probmap" and count != len(meta.labels):
            return (
                f"output '{out.name}' has shape {out.shape_text()}: {count} classes, but {len(meta.labels)} labels "
                "are declared (give one label per class with --labels)"
            )
    if fits:
        return None
    found = task_of_output(out, (meta.input.height, meta.input.width))
    hint = ""
    if found is not None:
        hint = f" (it reads as a {found[0]} model" + (f", format {found[1]}" if found[1] else "") + ")"
    return f"output '{out.name}' has shape {out.shape_text()}{hint}, but {declared} needs {expected_output(meta)}"


def read_model(path: str | Path, graph: GraphInfo, overrides: Overrides | None = None) -> ModelReading:
    """Everything edgewire can tell about a model: its own entry if it has one, else exporter
    metadata (Ultralytics' ``names``, ``imgsz``, ``stride``, ``task``) and the graph's shapes,
    completed by ``overrides``; what stays unknown is listed in ``missing``. An entry is read as
    it stands (``edgewire model annotate`` rewrites one: :mod:`edgewire.model_inspect`)."""
    o = overrides or Overrides()
    path = str(path)
    raw = graph.metadata.get(META_KEY)
    if raw:
        reading = ModelReading(path, graph, "edgewire", inferred={"everything": f"the '{META_KEY}' entry"})
        return checked_reading(reading, parse_model_meta(raw, f"{path} (ONNX metadata)"), graph)
    exporter = {k: graph.metadata[k] for k in ("names", "imgsz", "stride", "task") if k in graph.metadata}
    reading = ModelReading(path, graph, "exporter" if exporter else "graph")
    inferred = reading.inferred
    if not graph.inputs or not graph.outputs:
        reading.problems.append("the graph has no input or no output")
        return reading

    # Input: layout and channels from the shape, size from the graph or the exporter.
    inp = graph.inputs[0]
    if len(inp.shape) != 4:
        reading.problems.append(f"input '{inp.name}' has shape {inp.shape_text()}; an image input has 4 dimensions")
        return reading
    layout = o.layout
    if layout is None:
        layout = "NHWC" if inp.shape[3] in (1, 3) and inp.shape[1] not in (1, 3) else "NCHW"
        inferred["input layout"] = "graph"
    channels = inp.shape[1] if layout == "NCHW" else inp.shape[3]
    hw = (inp.shape[2], inp.shape[3]) if layout == "NCHW" else (inp.shape[1], inp.shape[2])
    size: tuple[int, int] | None = o.input_size
    if size is None and hw[0] is not None and hw[1] is not None:
        size, inferred["input size"] = (hw[0], hw[1]), "graph"
    if size is None and (exported := _exporter_size(graph.metadata)) is not None:
        size, inferred["input size"] = exported, "exporter metadata 'imgsz'"
    if size is None:
        reading.missing.append("input size")
    if channels is None:
        channels = 1 if o.color == "gray" else 3
    color = o.color
    if color is None and channels == 1:
        color, inferred["color"] = "gray", "graph (1 channel)"
    elif color is None and exporter:
        color, inferred["color"] = "rgb", "exporter (Ultralytics models take RGB)"
    elif color is None:
        reading.missing.append("color")

    # Output: the task and format from its shape, unless stated.
    out = graph.output(o.output) if o.output else graph.outputs[0]
    if out is None:
        reading.problems.append(f"no output '{o.output}' in the graph ({[t.name for t in graph.outputs]})")
        return reading
    seen = task_of_output(out, size or (None, None))
    task: Task | None = o.task
    exporter_task = graph.metadata.get("task")
    if task is None and exporter_task in ("classify", "detect"):
        task, inferred["task"] = exporter_task, "exporter metadata 'task'"  # type: ignore[assignment]
    if task is None and seen is not None:
        task, inferred["task"] = seen[0], f"output shape {out.shape_text()}"
    if task is None:
        reading.missing.append("task")
    fmt: OutputFormat | None = o.format
    if task == "detect" and fmt is None:
        if seen is not None and seen[1] is not None:
            fmt, inferred["output format"] = seen[1], f"output shape {out.shape_text()}"
        else:
            reading.missing.append("output format")

    labels = o.labels
    if labels is None and (labels := _exporter_labels(graph.metadata)) is not None:
        inferred["labels"] = f"exporter metadata 'names' ({len(labels)})"
    if labels is None and fmt == "probmap":
        labels, inferred["labels"] = ("text",), "probability map (one class)"
    if labels is None:
        reading.missing.append("labels")

    detecting = task == "detect"
    resize = o.resize or ("letterbox" if detecting else "stretch")
    if o.resize is None:
        inferred["resize"] = "default for the task"
    if o.scale is None and o.mean is None and o.std is None:
        inferred["normalisation"] = "default (pixel / 255)"
    if reading.missing or reading.problems or size is None or color is None or task is None or labels is None:
        return reading
    stride = _literal(graph.metadata.get("stride"))
    shape = (
        (inp.shape[0] or -1, channels, size[0], size[1]) if layout == "NCHW" else (inp.shape[0] or -1, *size, channels)
    )
    try:
        meta = ModelMeta(
            name=o.name or Path(path).stem,
            version=o.version or "1",
            task=task,
            labels=labels,
            input=InputSpec(
                name=inp.name,
                shape=shape,  # type: ignore[arg-type]
                layout=layout,
                color=color,
                resize=resize,
                scale=o.scale if o.scale is not None else 1.0 / 255.0,
                mean=o.mean or (0.0,),
                std=o.std or (1.0,),
                pad_value=o.pad_value if o.pad_value is not None else (LETTERBOX_PAD if detecting else 0),
            ),
            output=out.name,
            detect=DetectSpec(format=fmt, stride=stride if isinstance(stride, int) else 32) if detecting else None,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        reading.problems.append(validation_problems(exc))
        return reading
    return checked_reading(reading, meta, graph)


def checked_reading(reading: ModelReading, meta: ModelMeta, graph: GraphInfo) -> ModelReading:
    """The reading with its metadata, once the outputs are shown to fit it; else the problem
    and the flags that fix it."""
    problem = output_problem(meta, graph)
    if problem:
        reading.problems.append(problem)
        reading.fix_flags += _fix_flags(meta, graph)
    else:
        reading.meta = meta
    return reading


def _fix_flags(meta: ModelMeta, graph: GraphInfo) -> list[str]:
    """The flags that repair what :func:`output_problem` found: the task the output shows, or
    labels matching the output's class count."""
    out = graph.output(meta.output)
    if out is None:
        return [f"--output {graph.outputs[0].name}"] if graph.outputs else []
    seen = task_of_output(out, (meta.input.height, meta.input.width))
    if seen is not None and seen[0] != meta.task:
        return [f"--task {seen[0]}"]
    return ["--labels LABELS.txt"]


def validation_problems(exc: ValidationError) -> str:
    """Pydantic's complaints about a contract, one clause each, for a reading's ``problems``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the entry'}: {e['msg']}" for e in exc.errors())
