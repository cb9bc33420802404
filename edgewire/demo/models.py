"""Demo models and camera-like frames, built from data that ships inside scikit-learn.

The demo needs two classifiers that disagree in a useful way: a small, fast *edge* model that
is right most of the time but unsure (and often wrong) on the hard cases, and a larger *cloud*
model that the edge escalates those cases to. Both are trained here on the handwritten digits
bundled with scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded: the
demo works offline, on a fresh checkout, and always produces the same artefacts.

Each model is converted to ONNX by skl2onnx at opset 13 / IR version 8, so the older
onnxruntime builds found on Jetsons load it; a Flatten in front lets it take the device's NCHW
tensor, and it carries its :class:`~edgewire.modelmeta.ModelMeta` under the ``edgewire``
metadata key.
The held-out digits are rendered as colour camera frames (upscaled, centred on a black canvas,
with a little sensor noise, JPEG-encoded) so the device pipeline does real decoding and
preprocessing: grayscale, centre crop, area resize to 8x8, ``pixel / 255``.

Everything is deterministic: the same arguments give byte-identical models and frames.
Training needs the optional ``models`` extra (scikit-learn, onnx, skl2onnx); measuring accuracy and
rendering frames use onnxruntime and OpenCV from the ``edge`` extra.
"""

from __future__ import annotations

import importlib
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgewire.durable import atomic_write
from edgewire.modelmeta import META_KEY, InputSpec, ModelMeta

__all__ = ["DemoArtifacts", "build_demo", "label_of"]

EDGE_NAME = "digits-edge"
CLOUD_NAME = "digits-cloud"
MODEL_VERSION = "1.0.0"
LABELS: tuple[str, ...] = tuple(str(i) for i in range(10))
INPUT_NAME = "image"
OUTPUT_NAME = "probs"

# The split every consumer of the demo agrees on: 540 held-out samples.
TEST_SIZE = 0.3
SPLIT_SEED = 0

# Edge: one tiny hidden layer, deliberately under-trained so that it lands around 90% and is
# unsure on most of its mistakes; that is what makes escalating to the cloud model worthwhile.
EDGE_HIDDEN: tuple[int, ...] = (12,)
EDGE_MAX_ITER = 80
# Cloud: a much larger network trained to convergence (~98%).
CLOUD_HIDDEN: tuple[int, ...] = (256, 128)
CLOUD_MAX_ITER = 300
TRAIN_SEED = 0

OPSET = 13
IR_VERSION = 8

# load_digits pixels are 0..16; a frame pixel is value * 255 / 16, so value / 16 == pixel / 255.
DIGIT_MAX = 16.0
JPEG_QUALITY = 90
NOISE_SIGMA = 3.0  # gray levels, per channel
IMAGE_FORMATS = {"jpg": ".jpg", "jpeg": ".jpg", "png": ".png"}

_FRAME_RE = re.compile(r"^\d{5}-\d+\.(?:jpg|jpeg|png)$")


@dataclass(frozen=True)
class DemoArtifacts:
    """Where :func:`build_demo` put things, and how well the two models did."""

    edge_model: Path
    cloud_model: Path
    frames_dir: Path
    labels_file: Path
    edge_accuracy: float
    cloud_accuracy: float


def label_of(frame_path: Path) -> int:
    """The true label of a demo frame, read from its name (``00042-7.jpg`` -> 7)."""
    stem = Path(frame_path).stem
    _, sep, tail = stem.rpartition("-")
    if not sep or not tail.isdigit():
        raise ValueError(f"not a demo frame name (expected '<index>-<label>.<ext>'): {frame_path}")
    return int(tail)


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(
            f"building the demo models needs the '{module}' package: pip install 'edgewire[{extra}]'"
        ) from exc


def _input_spec() -> InputSpec:
    return InputSpec(
        name=INPUT_NAME,
        shape=(-1, 1, 8, 8),
        layout="NCHW",
        color="gray",
        resize="center_crop",
        scale=1.0 / 255.0,
        mean=(0.0,),
        std=(1.0,),
    )


def _meta(name: str) -> ModelMeta:
    return ModelMeta(
        name=name,
        version=MODEL_VERSION,
        labels=LABELS,
        input=_input_spec(),
        output=OUTPUT_NAME,
        output_kind="probabilities",
    )


def _train(x: np.ndarray, y: np.ndarray, hidden: Sequence[int], max_iter: int) -> Any:
    neural_network = _require("sklearn.neural_network", "models")
    exceptions = _require("sklearn.exceptions", "models")
    clf = neural_network.MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=max_iter, random_state=TRAIN_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _to_onnx(clf: Any, name: str) -> bytes:
    """A fitted MLPClassifier as ONNX, converted by skl2onnx, taking the device's NCHW tensor.

    skl2onnx converts the classifier for a flat (N, 64) input and adds a label output; the
    device feeds (N, 1, 8, 8) and reads probabilities only. So the converted graph gets a
    Flatten in front of it, keeps just the probability path (onnx's own extractor), and carries
    the model's metadata.
    """
    onnx = _require("onnx", "models")
    convert = _require("skl2onnx", "models")
    data_types = _require("skl2onnx.common.data_types", "models")
    if [int(c) for c in clf.classes_] != list(range(len(LABELS))):
        raise ValueError(f"unexpected classes {list(clf.classes_)}")

    flat = "flat_image"
    converted = convert.convert_sklearn(
        clf,
        name,
        initial_types=[(flat, data_types.FloatTensorType([None, 8 * 8]))],
        final_types=[
            ("label", data_types.Int64TensorType([None])),
            (OUTPUT_NAME, data_types.FloatTensorType([None, len(LABELS)])),
        ],
        options={id(clf): {"zipmap": False}},
        target_opset=OPSET,
    )
    graph = converted.graph
    graph.node.insert(0, onnx.helper.make_node("Flatten", [INPUT_NAME], [flat], name="flatten", axis=1))
    del graph.input[:]
    graph.input.append(onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["N", 1, 8, 8]))
    probabilities = onnx.utils.Extractor(converted).extract_model([INPUT_NAME], [OUTPUT_NAME])
    probabilities.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    # The extracted graph no longer uses the ai.onnx.ml operators of the label path.
    used = {node.domain for node in probabilities.graph.node}
    kept = [o for o in probabilities.opset_import if o.domain in used or o.domain == ""]
    del probabilities.opset_import[:]
    probabilities.opset_import.extend(kept)
    probabilities.ir_version = IR_VERSION
    probabilities.producer_name = "edgewire"
    probabilities.doc_string = f"{name}: edgewire demo classifier for 8x8 handwritten digits (load_digits)"
    onnx.helper.set_model_props(probabilities, {META_KEY: _meta(name).model_dump_json()})
    onnx.checker.check_model(probabilities)
    return probabilities.SerializeToString(deterministic=True)


def _onnx_accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    ort = _require("onnxruntime", "edge")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    probs = session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32).reshape(-1, 1, 8, 8)})[0]
    return float(np.mean(np.argmax(probs, axis=1) == y))


def _render_frame(digit: np.ndarray, index: int, frame_size: tuple[int, int]) -> np.ndarray:
    """One held-out 8x8 digit (values 0..16) as a BGR camera frame of ``frame_size`` (w, h)."""
    cv2 = _require("cv2", "edge")
    width, height = frame_size
    side = min(width, height)
    gray = digit.reshape(8, 8).astype(np.float32) * (255.0 / DIGIT_MAX)
    # Bicubic upscaling gives the soft edges of a real camera image rather than hard blocks;
    # the device's area resize of the centre crop back to 8x8 still recovers each cell to
    # within a few percent, so accuracy on frames stays close to accuracy on the raw data.
    up = np.clip(cv2.resize(gray, (side, side), interpolation=cv2.INTER_CUBIC), 0.0, 255.0)
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    top, left = (height - side) // 2, (width - side) // 2
    canvas[top : top + side, left : left + side, :] = up[:, :, None]
    # Mild sensor noise, seeded by the frame's index so every build renders the same pixels.
    canvas += np.random.default_rng(index).standard_normal(canvas.shape, dtype=np.float32) * NOISE_SIGMA
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, ext: str) -> bytes:
    cv2 = _require("cv2", "edge")
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {ext} frame")
    return buf.tobytes()


def _write_frames(
    frames_dir: Path,
    x_test: np.ndarray,
    y_test: np.ndarray,
    frame_size: tuple[int, int],
    image_format: str,
) -> dict[str, int]:
    ext = IMAGE_FORMATS[image_format]
    frames_dir.mkdir(parents=True, exist_ok=True)
    labels: dict[str, int] = {}
    for index, (digit, label) in enumerate(zip(x_test, y_test, strict=True)):
        filename = f"{index:05d}-{int(label)}.{image_format}"
        frame = _encode(_render_frame(digit, index, frame_size), ext)
        # Hundreds of small, reproducible files: atomic but not fsynced one by one.
        atomic_write(frames_dir / filename, frame, fsync=False)
        labels[filename] = int(label)
    # Frames left over from an earlier build with another format would pollute a directory scan.
    for stale in frames_dir.iterdir():
        if stale.is_file() and _FRAME_RE.match(stale.name) and stale.name not in labels:
            stale.unlink()
    return labels


def build_demo(
    out: Path,
    *,
    frame_size: tuple[int, int] = (320, 240),
    image_format: str = "jpg",
    progress: Callable[[str], None] | None = None,
) -> DemoArtifacts:
    """Train the edge and cloud digit models, export them to ONNX and render held-out frames.

    Writes ``<out>/models/digits-edge.onnx``, ``<out>/models/digits-cloud.onnx``, one image per
    held-out sample in ``<out>/frames`` and ``<out>/frames/labels.json``. Deterministic; files
    are replaced atomically, so rebuilding over an existing demo is safe.
    """
    image_format = image_format.lower().lstrip(".")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, not {image_format!r}")
    width, height = (int(v) for v in frame_size)
    if min(width, height) < 8:
        raise ValueError(f"frame_size must be at least 8x8, got {frame_size}")

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    datasets = _require("sklearn.datasets", "models")
    model_selection = _require("sklearn.model_selection", "models")
    # Fail early, before minutes of work, if the edge extra is missing too.
    _require("onnxruntime", "edge")
    _require("cv2", "edge")

    out = Path(out)
    models_dir, frames_dir = out / "models", out / "frames"

    say("loading scikit-learn digits")
    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    x_train01, x_test01 = x_train / DIGIT_MAX, x_test / DIGIT_MAX

    results: dict[str, tuple[Path, float]] = {}
    for name, hidden, max_iter in (
        (EDGE_NAME, EDGE_HIDDEN, EDGE_MAX_ITER),
        (CLOUD_NAME, CLOUD_HIDDEN, CLOUD_MAX_ITER),
    ):
        kind = name.rsplit("-", 1)[1]
        say(f"training {kind} model")
        clf = _train(x_train01, y_train, hidden, max_iter)
        say(f"exporting {kind} model to ONNX")
        data = _to_onnx(clf, name)
        path = models_dir / f"{name}.onnx"
        atomic_write(path, data)
        accuracy = _onnx_accuracy(data, x_test01, y_test)
        say(f"{kind} model: {accuracy:.1%} held-out accuracy ({len(data) / 1024:.1f} KiB)")
        results[name] = (path, accuracy)

    say(f"rendering {len(y_test)} held-out frames")
    labels = _write_frames(frames_dir, x_test, y_test, (width, height), image_format)
    labels_file = frames_dir / "labels.json"
    atomic_write(labels_file, (json.dumps(labels, indent=1, sort_keys=True) + "\n").encode())
    say("demo ready")

    return DemoArtifacts(
        edge_model=results[EDGE_NAME][0],
        cloud_model=results[CLOUD_NAME][0],
        frames_dir=frames_dir,
        labels_file=labels_file,
        edge_accuracy=results[EDGE_NAME][1],
        cloud_accuracy=results[CLOUD_NAME][1],
    )
