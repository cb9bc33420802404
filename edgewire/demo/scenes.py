"""Camera-like detection scenes built from scikit-learn's handwritten digits, with ground truth.

The detect demo needs frames a detector can be trained and scored on without downloading a
data set: a 320x240 gray-ish camera frame holding a few digits (``load_digits``, 8x8, upscaled
to 20-60 px) at random places, on a background with clutter (strokes, blobs, a gradient) and
sensor noise. A *sequence* is the same scene over a few frames with every digit drifting a few
pixels per frame, which is what a tracker on the device sees from a fixed camera.

Digits are split by the same held-out split as the classifier demo (``TEST_SIZE``,
``SPLIT_SEED``), so scenes for training the detector never show a digit the scoring scenes use.
Everything is seeded: the same arguments give the same pixels and boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["Scene", "digit_pool", "render_scene", "scene_sequence", "scenes"]

FRAME_W, FRAME_H = 320, 240
MIN_SIDE, MAX_SIDE = 20, 60
DIGIT_MAX = 16.0
NOISE_SIGMA = 6.0


@dataclass(frozen=True)
class Scene:
    """One frame (H, W, 3 uint8, BGR) and its objects: boxes x1,y1,x2,y2 in pixels, classes, ids."""

    image: np.ndarray
    boxes: np.ndarray  # (K, 4) float32
    classes: np.ndarray  # (K,) int64
    object_ids: np.ndarray  # (K,) int64, stable across the frames of a sequence


@cache
def digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits (values 0..16) and labels of the classifier demo's ``train`` or ``test`` split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from edgewire.demo.models import SPLIT_SEED, TEST_SIZE

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    if split == "train":
        return x_train.reshape(-1, 8, 8), y_train.astype(np.int64)
    if split == "test":
        return x_test.reshape(-1, 8, 8), y_test.astype(np.int64)
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dim gradient with clutter: thin strokes and soft blobs a detector must learn to ignore."""
    import cv2

    h, w = FRAME_H, FRAME_W
    base = rng.uniform(10, 50)
    gx, gy = rng.uniform(-20, 20, size=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    canvas = base + gx * xx / w + gy * yy / h
    for _ in range(int(rng.integers(2, 6))):
        p1 = tuple(int(v) for v in rng.integers((0, 0), (w, h)))
        p2 = tuple(int(v) for v in rng.integers((0, 0), (w, h)))
        cv2.line(canvas, p1, p2, float(rng.uniform(60, 140)), int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 4))):
        centre = tuple(int(v) for v in rng.integers((0, 0), (w, h)))
        axes = tuple(int(v) for v in rng.integers(4, 14, size=2))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(50, 120)), -1)
    return cv2.GaussianBlur(canvas, (3, 3), 0)


def _place(rng: np.random.Generator, sides: np.ndarray) -> np.ndarray | None:
    """Top-left corners for squares of ``sides`` that do not overlap (with a small gap), or None."""
    corners: list[tuple[float, float, float]] = []
    for side in sides:
        for _ in range(50):
            x = float(rng.uniform(0, FRAME_W - side))
            y = float(rng.uniform(0, FRAME_H - side))
            gap = 4
            if all(
                x + side + gap <= cx or cx + cs + gap <= x or y + side + gap <= cy or cy + cs + gap <= y
                for cx, cy, cs in corners
            ):
                corners.append((x, y, float(side)))
                break
        else:
            return None
    return np.array([(x, y) for x, y, _ in corners], dtype=np.float32)


def render_scene(
    background: np.ndarray,
    digits: np.ndarray,
    corners: np.ndarray,
    sides: np.ndarray,
    noise_seed: int,
) -> np.ndarray:
    """Paint digits (8x8, 0..16) as ``sides``-pixel squares at ``corners`` over ``background``."""
    import cv2

    canvas = background.copy()
    for digit, (x, y), side in zip(digits, corners, sides, strict=True):
        s = int(side)
        up = cv2.resize(digit.astype(np.float32) * (255.0 / DIGIT_MAX), (s, s), interpolation=cv2.INTER_CUBIC)
        x0, y0 = round(float(x)), round(float(y))
        patch = canvas[y0 : y0 + s, x0 : x0 + s]
        up = up[: patch.shape[0], : patch.shape[1]]
        # Ink over the background: the brighter of the two, as a white pen on a dark card.
        canvas[y0 : y0 + up.shape[0], x0 : x0 + up.shape[1]] = np.maximum(patch, up)
    canvas = canvas + np.random.default_rng(noise_seed).standard_normal(canvas.shape, dtype=np.float32) * NOISE_SIGMA
    gray = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def scene_sequence(seed: int, frames: int, split: str = "test", drift_px: float = 3.0) -> list[Scene]:
    """``frames`` frames of one scene; each digit drifts up to ``drift_px`` pixels per frame."""
    pool_x, pool_y = digit_pool(split)
    rng = np.random.default_rng(seed)
    while True:
        count = int(rng.integers(2, 6))
        sides = np.rint(rng.uniform(MIN_SIDE, MAX_SIDE, size=count)).astype(np.int64)
        corners = _place(rng, sides)
        if corners is not None:
            break
    picks = rng.choice(len(pool_y), size=count, replace=False)
    digits, classes = pool_x[picks], pool_y[picks]
    velocity = rng.uniform(-drift_px, drift_px, size=(count, 2)).astype(np.float32)
    background = _background(rng)
    out = []
    for t in range(frames):
        at = corners + velocity * t
        # Keep every digit wholly inside the frame, as a camera's fixed field of view would.
        at[:, 0] = np.clip(at[:, 0], 0, FRAME_W - sides)
        at[:, 1] = np.clip(at[:, 1], 0, FRAME_H - sides)
        at = np.rint(at)
        image = render_scene(background, digits, at, sides, noise_seed=seed * 1000 + t)
        boxes = np.concatenate([at, at + sides[:, None]], axis=1).astype(np.float32)
        out.append(Scene(image, boxes, classes.copy(), np.arange(count, dtype=np.int64)))
    return out


def scenes(count: int, seed: int, split: str = "test") -> list[Scene]:
    """``count`` independent single frames."""
    return [scene_sequence(seed * 100_003 + i, 1, split)[0] for i in range(count)]
