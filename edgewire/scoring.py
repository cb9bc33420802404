"""Class probabilities to predictions: top-1 label, confidence and top-2 margin.

The device's judge and the cloud bridge read model outputs the same way, so both use this.
"""

from __future__ import annotations

import numpy as np

from edgewire.envelopes import Prediction


def top2(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best class index, its probability and its margin over the runner-up, per row (N x C).

    A device runs this on every micro-batch while it holds the interpreter, so it is three
    array calls: one partial sort puts each row's two largest last, one argmax finds the best.
    On a tie the lower class index is the best, with margin 0."""
    n, classes = probs.shape
    if classes == 1:
        return np.zeros(n, dtype=np.intp), probs[:, 0].copy(), probs[:, 0].copy()
    top = np.partition(probs, classes - 2, axis=1)
    conf = top[:, -1]
    return probs.argmax(axis=1), conf, conf - top[:, -2]


def predictions(probs: np.ndarray, labels: tuple[str, ...] | list[str]) -> list[Prediction]:
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"model gives {probs.shape[-1]} classes but declares {len(labels)} labels")
    best, conf, margin = top2(probs)
    return [
        Prediction.model_construct(label=labels[int(k)], class_index=int(k), confidence=float(c), margin=float(m))
        for k, c, m in zip(best, conf, margin, strict=True)
    ]
