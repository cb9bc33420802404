"""Triton model repositories built from edgewire's ONNX artefacts, and the way back to their contract.

The same ONNX file that devices run is what the cloud serves, so the repository is generated
from it rather than written by hand: tensor names, dtypes and dims come from the graph, and the
model's :class:`~edgewire.modelmeta.ModelMeta` travels in ``config.pbtxt`` as the ``edgewire``
parameter. The bridge then learns labels and preprocessing from Triton itself
(``get_model_config``), so a model swapped on the server cannot silently disagree with the
bridge's idea of it.

Two layouts exist because two Tritons exist: the pytriton wheel carries only the python backend
(``write_python_repository``: a small ``model.py`` that runs onnxruntime), while the NGC
container serves ONNX natively (``write_onnxruntime_repository``).
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewire import durable
from edgewire.errors import ModelError
from edgewire.modelmeta import META_KEY, GraphInfo, ModelMeta, TensorInfo, parse_model_meta, read_model

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "MODEL_VERSION_DIR",
    "model_meta_from_config",
    "write_onnxruntime_repository",
    "write_python_repository",
]

DEFAULT_MAX_BATCH_SIZE = 64
# Triton versions are integers; the artefact's own version lives in the edgewire parameter.
MODEL_VERSION_DIR = "1"
# Long enough for the batcher to merge requests that arrive together, short next to a
# sub-millisecond inference.
DEFAULT_QUEUE_DELAY_US = 200

_PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")
# Triton uses the directory name as the model name and puts it in URLs.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# onnx.TensorProto.DataType values, spelled out so the table does not need onnx imported.
_ONNX_ELEM_TYPE = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}
_ORT_TYPE = {
    "tensor(float)": "TYPE_FP32",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(string)": "TYPE_STRING",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(bfloat16)": "TYPE_BF16",
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    data_type: str
    shape: tuple[int, ...]  # -1 where the graph leaves a dimension open


@dataclass(frozen=True)
class _OnnxModel:
    path: Path
    meta: ModelMeta
    inputs: tuple[_Tensor, ...]
    outputs: tuple[_Tensor, ...]


def _read_with_onnx(path: Path, onnx: Any) -> tuple[dict[str, str], list[_Tensor], list[_Tensor]]:
    # Weights are not needed, only the graph's signature.
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    initializers = {i.name for i in proto.graph.initializer}

    def tensors(values: Iterable[Any]) -> list[_Tensor]:
        out = []
        for v in values:
            if v.name in initializers:  # IR < 4 lists weights among the inputs
                continue
            if not v.type.HasField("tensor_type"):
                raise ModelError(f"{path}: '{v.name}' is not a tensor; Triton cannot serve it")
            tt = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
            dtype = _ONNX_ELEM_TYPE.get(tt.elem_type)
            if dtype is None:
                raise ModelError(f"{path}: tensor '{v.name}' has ONNX element type {tt.elem_type}, unknown to Triton")
            out.append(_Tensor(v.name, dtype, dims))
        return out

    return props, tensors(proto.graph.input), tensors(proto.graph.output)


def _read_with_onnxruntime(path: Path, ort: Any) -> tuple[dict[str, str], list[_Tensor], list[_Tensor]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map

    def tensors(values: Iterable[Any]) -> list[_Tensor]:
        out = []
        for v in values:
            dtype = _ORT_TYPE.get(v.type)
            if dtype is None:
                raise ModelError(f"{path}: tensor '{v.name}' has type {v.type}, unknown to Triton")
            dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in v.shape)
            out.append(_Tensor(v.name, dtype, dims))
        return out

    return props, tensors(session.get_inputs()), tensors(session.get_outputs())


def _read_onnx(path: Path) -> _OnnxModel:
    """Read the signature with the onnx package when present (no session is built), else onnxruntime."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            metadata, inputs, outputs = _read_with_onnx(path, onnx)
        else:
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise ModelError("reading ONNX models needs onnx or onnxruntime: pip install 'edgewire[edge]'") from exc
            metadata, inputs, outputs = _read_with_onnxruntime(path, ort)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model: {exc}") from exc

    # A model with only its exporter's metadata (a YOLO export) is read as the device reads it;
    # the contract inferred is what config.pbtxt then carries.
    graph = GraphInfo(
        tuple(TensorInfo(t.name, tuple(None if d < 0 else d for d in t.shape)) for t in inputs),
        tuple(TensorInfo(t.name, tuple(None if d < 0 else d for d in t.shape)) for t in outputs),
        metadata,
    )
    meta = read_model(path, graph).require()
    if not _NAME_RE.match(meta.name):
        raise ModelError(f"{path}: model name {meta.name!r} cannot be a Triton model directory")
    in_names, out_names = [t.name for t in inputs], [t.name for t in outputs]
    if meta.input.name not in in_names:
        raise ModelError(f"{path}: metadata names input '{meta.input.name}' but the graph's inputs are {in_names}")
    if meta.output not in out_names:
        raise ModelError(f"{path}: metadata names output '{meta.output}' but the graph's outputs are {out_names}")
    for t in (*inputs, *outputs):
        if not t.shape:
            raise ModelError(f"{path}: tensor '{t.name}' is a scalar; Triton needs at least one dimension")
    return _OnnxModel(path, meta, tuple(inputs), tuple(outputs))


def _quote(text: str) -> str:
    # Protobuf text format has no \u escapes, so JSON quoting would not round-trip.
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def _tensor_block(kind: str, tensors: Iterable[_Tensor], batched: bool) -> list[str]:
    lines = [f"{kind} ["]
    entries = []
    for t in tensors:
        dims = t.shape[1:] if batched else t.shape
        entries.append(
            f"  {{\n    name: {_quote(t.name)}\n    data_type: {t.data_type}\n"
            f"    dims: [ {', '.join(map(str, dims))} ]\n  }}"
        )
    lines.append(",\n".join(entries))
    lines.append("]")
    return lines


def _config_text(
    model: _OnnxModel,
    *,
    header: list[str],
    max_batch_size: int,
    queue_delay_us: int,
    tail: list[str],
    parameters: Mapping[str, str],
) -> str:
    # Triton batches on a leading dimension the graph leaves open; a fixed one means the
    # model takes exactly that many rows and is served unbatched with its full shape.
    batched = max_batch_size > 0 and all(t.shape[0] == -1 for t in (*model.inputs, *model.outputs))
    lines = [f"name: {_quote(model.meta.name)}", *header, f"max_batch_size: {max_batch_size if batched else 0}"]
    lines += _tensor_block("input", model.inputs, batched)
    lines += _tensor_block("output", model.outputs, batched)
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    lines += tail
    params = {META_KEY: model.meta.model_dump_json(), **parameters}
    for key, value in params.items():
        lines.append(f"parameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` unless it already holds ``data``, so a rerun leaves mtimes alone.

    Triton in poll mode reloads a model whose files change; rewriting identical bytes would
    bounce every model on each run.
    """
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    durable.atomic_write(path, data, fsync=False)


def _atomic_copy(src: Path, dst: Path) -> None:
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_all(models: Iterable[Path]) -> list[_OnnxModel]:
    read: list[_OnnxModel] = []
    seen: dict[str, Path] = {}
    for path in models:
        model = _read_onnx(Path(path))
        if model.meta.name in seen:
            raise ModelError(f"{path} and {seen[model.meta.name]} both declare the model name '{model.meta.name}'")
        seen[model.meta.name] = model.path
        read.append(model)
    return read


def _install(repo: Path, model: _OnnxModel, config: str, extra: Mapping[str, bytes], stale: Iterable[str]) -> None:
    # Config last: a model directory is only a model to Triton once config.pbtxt is there.
    model_dir = repo / model.meta.name
    version_dir = model_dir / MODEL_VERSION_DIR
    version_dir.mkdir(parents=True, exist_ok=True)
    _atomic_copy(model.path, version_dir / "model.onnx")
    for name, data in extra.items():
        _atomic_write(version_dir / name, data)
    for name in stale:
        (version_dir / name).unlink(missing_ok=True)
    _atomic_write(model_dir / "config.pbtxt", config.encode())


def write_python_repository(
    repo: Path,
    models: list[Path],
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    instances: int = 1,
    intra_op_threads: int = 1,
) -> list[str]:
    """Lay out ``models`` for Triton's python backend (what the pytriton wheel can serve).

    Every model is read and checked before anything is written, so one bad artefact leaves
    the repository as it was. Returns the model names, in the order given.
    """
    read = _read_all(models)
    source = _PYTHON_MODEL_SOURCE.read_bytes()
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    for model in read:
        config = _config_text(
            model,
            header=['backend: "python"'],
            max_batch_size=max_batch_size,
            queue_delay_us=queue_delay_us,
            tail=[f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]"],
            parameters={"intra_op_num_threads": str(intra_op_threads)},
        )
        _install(repo, model, config, {"model.py": source}, stale=())
    return [m.meta.name for m in read]


def write_onnxruntime_repository(
    repo: Path,
    models: list[Path],
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> list[str]:
    """Lay out ``models`` for the NGC Triton container's onnxruntime backend.

    No instance_group is written: Triton then places instances on the GPUs it finds, or on
    the CPU where there are none, which is what a cloud deployment wants by default.
    """
    read = _read_all(models)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    for model in read:
        config = _config_text(
            model,
            header=['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"'],
            max_batch_size=max_batch_size,
            queue_delay_us=queue_delay_us,
            tail=[],
            parameters={},
        )
        # A python-layout model.py left behind would not be used, but would mislead a reader.
        _install(repo, model, config, {}, stale=("model.py",))
    return [m.meta.name for m in read]


def _parameter_from_dict(config: Mapping[str, Any]) -> tuple[str, str | None]:
    inner = config.get("config")
    if isinstance(inner, Mapping):  # grpc's as_json=True wraps the config; HTTP does not
        config = inner
    name = str(config.get("name", "?"))
    entry = (config.get("parameters") or {}).get(META_KEY)
    if not isinstance(entry, Mapping):
        return name, None
    value = entry.get("string_value", entry.get("stringValue"))
    return name, value if isinstance(value, str) else None


def model_meta_from_config(config: dict[str, Any] | ModelConfig) -> ModelMeta:
    """The model's contract as Triton reports it, from whatever ``get_model_config`` returned.

    Accepts grpc's ``ModelConfigResponse`` or its ``.config``, and the dicts of grpc's
    ``as_json=True`` and of the HTTP client.
    """
    if isinstance(config, Mapping):
        name, raw = _parameter_from_dict(config)
    else:
        message: Any = config
        if hasattr(message, "config") and not hasattr(message, "parameters"):  # ModelConfigResponse
            message = message.config
        if not hasattr(message, "parameters"):
            raise ModelError(f"not a Triton model config: {type(config).__name__}")
        name = message.name or "?"
        raw = message.parameters[META_KEY].string_value if META_KEY in message.parameters else None
    return parse_model_meta(raw, f"config.pbtxt of Triton model '{name}'")
