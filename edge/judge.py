"""Decides which local answers are good enough and which frames are hard cases for the cloud.

Policies are independent and all apply: a frame is hard if any of them says so, and every
reason is kept, because operators tune thresholds by looking at why frames escalated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgewire.config import JudgeSettings
from edgewire.envelopes import Prediction
from edgewire.scoring import top2

LOW_CONFIDENCE = "low_confidence"
LOW_MARGIN = "low_margin"
UNKNOWN_CLASS = "unknown_class"
BLURRY = "blurry"


#: The reasons in the order a frame lists them, one bit each in a batch's reason codes.
_POLICIES = (LOW_CONFIDENCE, LOW_MARGIN, UNKNOWN_CLASS, BLURRY)
_REASONS: tuple[tuple[str, ...], ...] = tuple(
    tuple(name for bit, name in enumerate(_POLICIES) if code >> bit & 1) for code in range(1 << len(_POLICIES))
)


@dataclass(frozen=True)
class Verdict:
    prediction: Prediction
    reasons: tuple[str, ...]
    sharpness: float | None

    @property
    def hard(self) -> bool:
        return bool(self.reasons)


@dataclass(slots=True)
class Verdicts:
    """A batch's verdicts as columns of plain Python values.

    A device judges sixteen frames in the time it takes to build one Prediction per frame, so
    the batch path reads these columns directly; :meth:`verdict` builds the per-frame object
    only for the frames that need one (those escalated).
    """

    labels: list[str]
    class_index: list[int]
    confidence: list[float]
    margin: list[float]
    reasons: list[tuple[str, ...]]
    sharpness: list[float | None]
    #: Indices of the hard frames, in order.
    hard: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def prediction(self, i: int) -> Prediction:
        return Prediction.model_construct(
            label=self.labels[i], class_index=self.class_index[i], confidence=self.confidence[i], margin=self.margin[i]
        )

    def verdict(self, i: int) -> Verdict:
        return Verdict(self.prediction(i), self.reasons[i], self.sharpness[i])


class Judge:
    def __init__(self, settings: JudgeSettings, labels: tuple[str, ...]) -> None:
        self.settings = settings
        self.labels = labels
        unknown = set(settings.unknown_labels)
        self._unknown_indices = frozenset(i for i, label in enumerate(labels) if label in unknown)
        #: The thresholds in each probability dtype's own precision, as an array comparison
        #: would take them: worked out once, not per batch.
        self._thresholds: dict[np.dtype, tuple[float, float]] = {}

    @property
    def wants_sharpness(self) -> bool:
        return self.settings.min_sharpness is not None

    def judge(self, probs: np.ndarray, sharpness: list[float | None] | None = None) -> list[Verdict]:
        """Judge a batch of probability rows (N x classes), one Verdict per row."""
        batch = self.judge_batch(probs, sharpness)
        return [batch.verdict(i) for i in range(len(batch))]

    def judge_batch(self, probs: np.ndarray, sharpness: list[float | None] | None = None) -> Verdicts:
        """Judge a batch of probability rows (N x classes) in one vectorised pass."""
        n, classes = probs.shape
        if classes != len(self.labels):
            raise ValueError(f"model gives {classes} classes but declares {len(self.labels)} labels")
        best, conf, margin = top2(probs)
        s = self.settings
        thresholds = self._thresholds.get(probs.dtype)
        if thresholds is None:
            cast = probs.dtype.type
            thresholds = self._thresholds[probs.dtype] = (float(cast(s.min_confidence)), float(cast(s.min_margin)))
        min_conf, min_margin = thresholds
        index, confidence, margins = best.tolist(), conf.tolist(), margin.tolist()
        # A batch is a handful of rows: plain Python over lists costs less than an array
        # operation per policy, and this runs on the workers while they hold the interpreter.
        unknown = self._unknown_indices
        codes = [
            (c < min_conf) | (m < min_margin) << 1 | (k in unknown) << 2
            for c, m, k in zip(confidence, margins, index, strict=True)
        ]
        sharp: list[float | None] = [None] * n if sharpness is None else list(sharpness)
        if s.min_sharpness is not None and sharpness is not None:
            limit = s.min_sharpness
            codes = [code | (v is not None and v < limit) << 3 for code, v in zip(codes, sharp, strict=True)]
        labels = self.labels
        reasons = _REASONS
        return Verdicts(
            labels=[labels[k] for k in index],
            class_index=index,
            confidence=confidence,
            margin=margins,
            reasons=[reasons[c] for c in codes],
            sharpness=sharp,
            hard=[i for i, c in enumerate(codes) if c],
        )
