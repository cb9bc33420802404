"""The detect demo's cloud model: a digit classifier for crops of detected boxes.

The classifier demo's cloud model was trained on tight, clean 8x8 digits; a crop of a box the
edge detector drew is neither tight nor clean (a few pixels off, clutter in the corners, some
boxes around no digit at all). So the detect demo's cloud gets its own model, trained on what it
will see: crops of the training scenes' digits with the box shifted and scaled at random, and
crops of background with no digit, labelled ``background``. A box relabelled ``background`` is
one the cloud says holds no digit; it keeps its place in the list, scored for no digit class.

It is a scikit-learn MLP over 16x16 gray crops (stretched, ``pixel / 255``), exported by skl2onnx
with edgewire's own metadata, so Triton serves it as it serves the other demo models. Features
for training are made by the same :class:`~edgewire.preprocess.Preprocessor` the bridge uses.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgewire.demo.build_cache import Built, cached_build
from edgewire.demo.scenes import FRAME_H, FRAME_W, scenes
from edgewire.modelmeta import META_KEY, InputSpec, ModelMeta
from edgewire.preprocess import Preprocessor

__all__ = ["CROP_LABELS", "CROP_MODEL_NAME", "build_crop_classifier", "crop_features", "to_onnx", "train"]

CROP_MODEL_NAME = "digits-crops"
CROP_LABELS: tuple[str, ...] = (*(str(i) for i in range(10)), "background")
SIDE = 16
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
TRAIN_SCENES = 400
JITTERS_PER_OBJECT = 4
BACKGROUND_PER_SCENE = 4
SEED = 11
HIDDEN = (192,)
MAX_ITER = 80
OPSET = 13
IR_VERSION = 8


def _spec() -> InputSpec:
    return InputSpec(name=INPUT_NAME, shape=(-1, 1, SIDE, SIDE), layout="NCHW", color="gray", resize="stretch")


def meta() -> ModelMeta:
    return ModelMeta(name=CROP_MODEL_NAME, version="1.0.0", labels=CROP_LABELS, input=_spec(), output=OUTPUT_NAME)


def crop_features(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(K, 256): each box cut from the BGR ``image`` as the bridge cuts and preprocesses it."""
    pre = Preprocessor(_spec())
    pieces = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 4).tolist():
        xa, ya = int(np.clip(np.floor(x1), 0, FRAME_W - 1)), int(np.clip(np.floor(y1), 0, FRAME_H - 1))
        xb, yb = int(np.clip(np.ceil(x2), xa + 1, FRAME_W)), int(np.clip(np.ceil(y2), ya + 1, FRAME_H))
        pieces.append(image[ya:yb, xa:xb])
    return pre.batch(pieces).reshape(len(pieces), SIDE * SIDE)


def _jittered(rng: np.random.Generator, box: np.ndarray) -> np.ndarray:
    side = float(box[2] - box[0])
    centre = (box[:2] + box[2:]) / 2 + rng.uniform(-0.2, 0.2, 2) * side
    half = side * rng.uniform(0.8, 1.25, 2) / 2
    return np.concatenate([centre - half, centre + half]).astype(np.float32)


def _background(rng: np.random.Generator, truth: np.ndarray) -> np.ndarray | None:
    from edgewire.detection import iou

    for _ in range(20):
        side = rng.uniform(20, 60)
        x, y = rng.uniform(0, FRAME_W - side), rng.uniform(0, FRAME_H - side)
        box = np.array([[x, y, x + side, y + side]], np.float32)
        if not len(truth) or iou(box, truth).max() < 0.2:
            return box[0]
    return None


def training_set(count: int = TRAIN_SCENES) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    xs, ys = [], []
    for scene in scenes(count, seed=SEED, split="train"):
        boxes, labels = [], []
        for box, cls in zip(scene.boxes, scene.classes, strict=True):
            for _ in range(JITTERS_PER_OBJECT):
                boxes.append(_jittered(rng, box))
                labels.append(int(cls))
        for _ in range(BACKGROUND_PER_SCENE):
            bg = _background(rng, scene.boxes)
            if bg is not None:
                boxes.append(bg)
                labels.append(len(CROP_LABELS) - 1)
        xs.append(crop_features(scene.image, np.array(boxes)))
        ys.append(np.array(labels, np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def train(count: int = TRAIN_SCENES) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = training_set(count)
    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=MAX_ITER, random_state=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    if [int(c) for c in clf.classes_] != list(range(len(CROP_LABELS))):
        raise RuntimeError(f"training crops did not show every class: {list(clf.classes_)}")
    return clf


def to_onnx(clf: Any) -> bytes:
    """The fitted MLP taking ``[N, 1, 16, 16]`` and giving ``[N, 11]`` probabilities."""
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    flat = "flat_image"
    converted = convert_sklearn(
        clf,
        CROP_MODEL_NAME,
        initial_types=[(flat, FloatTensorType([None, SIDE * SIDE]))],
        final_types=[("label", Int64TensorType([None])), (OUTPUT_NAME, FloatTensorType([None, len(CROP_LABELS)]))],
        options={id(clf): {"zipmap": False}},
        target_opset=OPSET,
    )
    graph = converted.graph
    graph.node.insert(0, onnx.helper.make_node("Flatten", [INPUT_NAME], [flat], name="flatten", axis=1))
    del graph.input[:]
    graph.input.append(onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["N", 1, SIDE, SIDE]))
    model = onnx.utils.Extractor(converted).extract_model([INPUT_NAME], [OUTPUT_NAME])
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    kept = [o for o in model.opset_import if o.domain == ""]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.ir_version = IR_VERSION
    model.producer_name = "edgewire"
    onnx.helper.set_model_props(model, {META_KEY: meta().model_dump_json()})
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def build_crop_classifier(models_dir: Path, *, force: bool = False) -> Built:
    """Train and export the crop classifier into ``models_dir/digits-crops.onnx``, unless a build
    from the same code and libraries is already there."""
    here = Path(__file__).parent
    sources = [here / "crop_classifier.py", here / "scenes.py"]
    path = Path(models_dir) / f"{CROP_MODEL_NAME}.onnx"
    return cached_build(path, sources, lambda: to_onnx(train()), force=force)
