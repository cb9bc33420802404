"""The detect demo's detector: trained here with scikit-learn, exported as a YOLOv8-layout ONNX.

Why scikit-learn: it is already the demo's training library, it installs beside the project's
pins (numpy < 2 for Triton's client) in seconds, and it trains this model on two cores in well
under a minute. torch would pull ~3 GB of CUDA wheels onto every CI runner, and jax2onnx needs
numpy 2, which the cloud extra cannot take.

The model is a grid detector: the 320x320 letterboxed input is averaged to gray, pooled 4x4,
and each 16-pixel cell of a 20x20 grid looks at a 64x64-pixel window centred on it (16x16
pooled values). Two small MLPs read that window: a classifier (background or one of ten digits)
and a regressor (box centre offset and size, in cells). The ONNX graph is the same computation:

- a prefix of plain ONNX ops gathers every cell's window at once: ReduceMean over colour,
  AveragePool 4x4, then a Conv whose 256 one-hot kernels (stride 4, padding 6) copy each window
  pixel into its own channel, Reshape/Transpose to ``[B*400, 256]``;
- the two MLPs as skl2onnx converts them (probabilities path only, as the classifier demo does);
- a suffix that turns cell offsets into ``xywh`` in input pixels and lays out
  ``[B, 4 + 10, 400]``, the layout Ultralytics' YOLOv8/11 export writes.

It carries Ultralytics-style metadata (``names``, ``imgsz``, ``stride``, ``task``, ``batch``)
and no ``edgewire`` entry, so the device reaches it by exactly the path a user's YOLO export
takes. Training is deterministic and cached by content (``edgewire.demo.build_cache``): a
rebuild with the same code, settings and library versions reuses the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgewire.demo.build_cache import Built, cached_build
from edgewire.demo.scenes import FRAME_H, FRAME_W, Scene, scenes

__all__ = [
    "DETECTOR_NAME",
    "NUM_CLASSES",
    "build_detector",
    "cell_features",
    "letterbox_input",
    "sklearn_outputs",
]

DETECTOR_NAME = "digits-detect"
DETECTOR_VERSION = "1.0.0"
NUM_CLASSES = 10
IMGSZ = 320
STRIDE = 16  # pixels per grid cell
GRID = IMGSZ // STRIDE  # 20
POOL = 4  # input pixels per pooled value
WINDOW = 16  # pooled values per window side (64 input pixels)
PAD = (WINDOW * POOL // 2 - STRIDE // 2) // POOL  # 6: windows centred on their cells
FEATURES = WINDOW * WINDOW
LETTERBOX_FILL = 114  # Ultralytics' padding colour
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
OPSET = 13
IR_VERSION = 8

TRAIN_SCENES = 500
TRAIN_SEED = 7
NEGATIVES_PER_SCENE = 40
CLS_HIDDEN = (128,)
CLS_MAX_ITER = 60
REG_HIDDEN = (64,)
REG_MAX_ITER = 120
MLP_SEED = 0


def letterbox_input(images: list[np.ndarray]) -> np.ndarray:
    """BGR frames of the demo's size as the model's ``[B, 3, 320, 320]`` RGB float tensor.

    The demo's 320x240 frames need no scaling, only Ultralytics' centred padding (40 rows above
    and below, colour 114); the device's letterbox does the same to any frame.
    """
    top = (IMGSZ - FRAME_H) // 2
    out = np.full((len(images), 3, IMGSZ, IMGSZ), LETTERBOX_FILL / 255.0, dtype=np.float32)
    for k, image in enumerate(images):
        if image.shape[:2] != (FRAME_H, FRAME_W):
            raise ValueError(f"expected a {FRAME_W}x{FRAME_H} frame, got {image.shape[1]}x{image.shape[0]}")
        out[k, :, top : top + FRAME_H, :] = image[:, :, ::-1].transpose(2, 0, 1) / np.float32(255.0)
    return out


def cell_features(tensor: np.ndarray) -> np.ndarray:
    """``[B, 3, 320, 320]`` to ``[B * 400, 256]``: what the graph's prefix computes, in NumPy."""
    b = tensor.shape[0]
    gray = tensor.mean(axis=1, dtype=np.float32)
    pooled = gray.reshape(b, IMGSZ // POOL, POOL, IMGSZ // POOL, POOL).mean(axis=(2, 4), dtype=np.float32)
    padded = np.pad(pooled, ((0, 0), (PAD, PAD), (PAD, PAD)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (WINDOW, WINDOW), axis=(1, 2))
    windows = windows[:, :: STRIDE // POOL, :: STRIDE // POOL]  # (B, 20, 20, 16, 16)
    return np.ascontiguousarray(windows.reshape(b * GRID * GRID, FEATURES), dtype=np.float32)


def _cell_centres() -> np.ndarray:
    """(400, 2) x, y of each cell's centre in input pixels, in the graph's cell order (row-major)."""
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    return (np.stack([xs.ravel(), ys.ravel()], axis=1) * STRIDE + STRIDE / 2).astype(np.float32)


def _targets(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: class (0 background, 1 + digit, -1 ignored) and regression target in cells."""
    centres = _cell_centres()
    top = (IMGSZ - FRAME_H) // 2
    boxes = scene.boxes + np.array([0, top, 0, top], dtype=np.float32)
    labels = np.zeros(len(centres), dtype=np.int64)
    reg = np.zeros((len(centres), 4), dtype=np.float32)
    for box, cls in zip(boxes, scene.classes, strict=True):
        bx, by = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        w, h = box[2] - box[0], box[3] - box[1]
        inside = (centres > box[:2]).all(axis=1) & (centres < box[2:]).all(axis=1)
        labels[inside & (labels == 0)] = -1  # off-centre parts of an object: neither object nor background
        reach = max(STRIDE / 2, 0.25 * float(w))
        near = (np.abs(centres[:, 0] - bx) <= reach) & (np.abs(centres[:, 1] - by) <= reach)
        labels[near] = 1 + int(cls)
        reg[near, 0] = (bx - centres[near, 0]) / STRIDE
        reg[near, 1] = (by - centres[near, 1]) / STRIDE
        reg[near, 2:] = (w / STRIDE, h / STRIDE)
    return labels, reg


def _training_set(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(TRAIN_SEED)
    feats, labels, reg_feats, reg_targets = [], [], [], []
    train = scenes(count, seed=TRAIN_SEED, split="train")
    for start in range(0, len(train), 50):
        chunk = train[start : start + 50]
        x = cell_features(letterbox_input([s.image for s in chunk])).reshape(len(chunk), GRID * GRID, FEATURES)
        for k, scene in enumerate(chunk):
            lab, reg = _targets(scene)
            pos = np.flatnonzero(lab > 0)
            neg = np.flatnonzero(lab == 0)
            neg = rng.choice(neg, size=min(NEGATIVES_PER_SCENE, len(neg)), replace=False)
            keep = np.concatenate([pos, neg])
            feats.append(x[k, keep])
            labels.append(lab[keep])
            reg_feats.append(x[k, pos])
            reg_targets.append(reg[pos])
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(reg_feats), np.concatenate(reg_targets)


def train(scene_count: int = TRAIN_SCENES) -> tuple[Any, Any]:
    """The fitted (classifier, regressor) pair, from ``scene_count`` training scenes; deterministic."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    x, y, xr, yr = _training_set(scene_count)
    clf = MLPClassifier(hidden_layer_sizes=CLS_HIDDEN, max_iter=CLS_MAX_ITER, random_state=MLP_SEED)
    reg = MLPRegressor(hidden_layer_sizes=REG_HIDDEN, max_iter=REG_MAX_ITER, random_state=MLP_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
        reg.fit(xr, yr)
    if [int(c) for c in clf.classes_] != list(range(NUM_CLASSES + 1)):
        raise RuntimeError(f"training scenes did not show every class: {list(clf.classes_)}")
    return clf, reg


def sklearn_outputs(clf: Any, reg: Any, tensor: np.ndarray) -> np.ndarray:
    """The ONNX model's output, computed by the fitted scikit-learn models: ``[B, 14, 400]``."""
    b = tensor.shape[0]
    x = cell_features(tensor)
    probs = clf.predict_proba(x).astype(np.float32)[:, 1:]
    offsets = reg.predict(x).astype(np.float32).reshape(-1, 4) * STRIDE
    centres = np.tile(_cell_centres(), (b, 1))
    xywh = offsets + np.concatenate([centres, np.zeros_like(centres)], axis=1)
    return np.concatenate([xywh, probs], axis=1).reshape(b, GRID * GRID, 4 + NUM_CLASSES).transpose(0, 2, 1)


def _metadata() -> dict[str, str]:
    names = "{" + ", ".join(f"{i}: '{i}'" for i in range(NUM_CLASSES)) + "}"
    return {
        "description": "edgewire demo digit detector (scikit-learn MLPs over grid cells, YOLOv8 output layout)",
        "author": "edgewire",
        "version": DETECTOR_VERSION,
        "task": "detect",
        "stride": str(STRIDE),
        "batch": "1",
        "imgsz": f"[{IMGSZ}, {IMGSZ}]",
        "names": names,
    }


def _converted(model: Any, name: str, output: str, width: int, classifier: bool) -> Any:
    """One fitted MLP as an ONNX graph from skl2onnx, reduced to the single output we use."""
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    final = [(output, FloatTensorType([None, width]))]
    options = {}
    if classifier:
        final = [("label", Int64TensorType([None])), *final]
        options = {id(model): {"zipmap": False}}
    converted = convert_sklearn(
        model,
        name,
        initial_types=[(f"{name}_features", FloatTensorType([None, FEATURES]))],
        final_types=final,
        options=options,
        target_opset=OPSET,
    )
    extracted = onnx.utils.Extractor(converted).extract_model([f"{name}_features"], [output])
    # Both MLPs name their weights alike ("coefficient", ...): prefix what is inside each graph,
    # keeping the names it is wired by (its input and output).
    graph = extracted.graph
    keep = {f"{name}_features", output}

    def renamed(edge: str) -> str:
        return edge if edge in keep or not edge else f"{name}_{edge}"

    for node in graph.node:
        node.name = f"{name}_{node.name}"
        node.input[:] = [renamed(e) for e in node.input]
        node.output[:] = [renamed(e) for e in node.output]
    for init in graph.initializer:
        init.name = renamed(init.name)
    return extracted


def to_onnx(clf: Any, reg: Any) -> bytes:
    """The fitted pair as one YOLOv8-layout ONNX model (see the module's docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cls_graph = _converted(clf, "cls", "cls_probs", NUM_CLASSES + 1, classifier=True).graph
    reg_graph = _converted(reg, "reg", "reg_cells", 4, classifier=False).graph

    one_hot = np.zeros((FEATURES, 1, WINDOW, WINDOW), dtype=np.float32)
    one_hot[np.arange(FEATURES), 0, np.arange(FEATURES) // WINDOW, np.arange(FEATURES) % WINDOW] = 1.0
    centres = np.concatenate([_cell_centres(), np.zeros((GRID * GRID, 2), np.float32)], axis=1)
    consts = [
        numpy_helper.from_array(one_hot, "window_kernels"),
        numpy_helper.from_array(np.array([0, FEATURES, GRID * GRID], np.int64), "shape_b_f_n"),
        numpy_helper.from_array(np.array([-1, FEATURES], np.int64), "shape_rows"),
        numpy_helper.from_array(np.array([-1, GRID * GRID, NUM_CLASSES + 1], np.int64), "shape_b_n_c"),
        numpy_helper.from_array(np.array([-1, GRID * GRID, 4], np.int64), "shape_b_n_4"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([NUM_CLASSES + 1], np.int64), "classes_end"),
        numpy_helper.from_array(np.array([2], np.int64), "last_axis"),
        numpy_helper.from_array(np.array(STRIDE, np.float32), "stride"),
        numpy_helper.from_array(centres, "cell_centres"),
    ]
    prefix = [
        helper.make_node("ReduceMean", [INPUT_NAME], ["gray"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["gray"], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node(
            "Conv", ["pooled", "window_kernels"], ["windows"], strides=[STRIDE // POOL] * 2, pads=[PAD] * 4
        ),
        helper.make_node("Reshape", ["windows", "shape_b_f_n"], ["windows_flat"]),
        helper.make_node("Transpose", ["windows_flat"], ["cells"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["cells", "shape_rows"], ["features"]),
        helper.make_node("Identity", ["features"], ["cls_features"]),
        helper.make_node("Identity", ["features"], ["reg_features"]),
    ]
    suffix = [
        helper.make_node("Reshape", ["cls_probs", "shape_b_n_c"], ["probs_bnc"]),
        helper.make_node("Slice", ["probs_bnc", "one", "classes_end", "last_axis"], ["scores"]),
        helper.make_node("Mul", ["reg_cells", "stride"], ["reg_pixels"]),
        helper.make_node("Reshape", ["reg_pixels", "shape_b_n_4"], ["offsets"]),
        helper.make_node("Add", ["offsets", "cell_centres"], ["xywh"]),
        helper.make_node("Concat", ["xywh", "scores"], ["rows"], axis=2),
        helper.make_node("Transpose", ["rows"], [OUTPUT_NAME], perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        [*prefix, *cls_graph.node, *reg_graph.node, *suffix],
        DETECTOR_NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, IMGSZ, IMGSZ])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4 + NUM_CLASSES, GRID * GRID])],
        [*consts, *cls_graph.initializer, *reg_graph.initializer],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgewire")
    model.ir_version = IR_VERSION
    model.doc_string = f"{DETECTOR_NAME}: edgewire demo digit detector, YOLOv8 output layout"
    helper.set_model_props(model, _metadata())
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(deterministic=True)


def build_detector(models_dir: Path, *, force: bool = False) -> Built:
    """Train and export the detector into ``models_dir/digits-detect.onnx``, unless a build from
    the same code and libraries is already there."""
    here = Path(__file__).parent
    sources = [here / "detector.py", here / "scenes.py"]
    return cached_build(Path(models_dir) / f"{DETECTOR_NAME}.onnx", sources, lambda: to_onnx(*train()), force=force)
