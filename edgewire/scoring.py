"""Class probabilities to predictions: top-1 label, confidence and top-2 margin.

The device's judge and the cloud bridge read model outputs the same way, so both use this.
"""

from __future__ import annotations

import numpy as np

from edgewire.envelopes import Prediction


def top2(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best class index, its probability and its margin over the runner-up, per row (N x C)."""
    n, classes = probs.shape
    if classes == 1:
        return np.zeros(n, dtype=int), probs[:, 0].copy(), probs[:, 0].copy()
    pair = np.argpartition(probs, -2, axis=1)[:, -2:]
    rows = np.arange(n)
    a, b = probs[rows, pair[:, 0]], probs[rows, pair[:, 1]]
    best = np.where(a >= b, pair[:, 0], pair[:, 1])
    conf = np.maximum(a, b)
    return best, conf, conf - np.minimum(a, b)


def predictions(probs: np.ndarray, labels: tuple[str, ...] | list[str]) -> list[Prediction]:
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"model gives {probs.shape[-1]} classes but declares {len(labels)} labels")
    best, conf, margin = top2(probs)
    return [
        Prediction.model_construct(label=labels[int(k)], class_index=int(k), confidence=float(c), margin=float(m))
        for k, c, m in zip(best, conf, margin, strict=True)
    ]
