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


@dataclass(frozen=True)
class Verdict:
    prediction: Prediction
    reasons: tuple[str, ...]
    sharpness: float | None

    @property
    def hard(self) -> bool:
        return bool(self.reasons)


class Judge:
    def __init__(self, settings: JudgeSettings, labels: tuple[str, ...]) -> None:
        self.settings = settings
        self.labels = labels
        unknown = set(settings.unknown_labels)
        self._unknown = np.array([label in unknown for label in labels], dtype=bool)

    @property
    def wants_sharpness(self) -> bool:
        return self.settings.min_sharpness is not None

    def judge(self, probs: np.ndarray, sharpness: list[float | None] | None = None) -> list[Verdict]:
        """Judge a batch of probability rows (N x classes) in one vectorised pass."""
        n, classes = probs.shape
        if classes != len(self.labels):
            raise ValueError(f"model gives {classes} classes but declares {len(self.labels)} labels")
        best, conf, margin = top2(probs)
        s = self.settings
        low_conf = conf < s.min_confidence
        low_margin = margin < s.min_margin
        unknown = self._unknown[best]
        verdicts = []
        for i in range(n):
            reasons = []
            if low_conf[i]:
                reasons.append(LOW_CONFIDENCE)
            if low_margin[i]:
                reasons.append(LOW_MARGIN)
            if unknown[i]:
                reasons.append(UNKNOWN_CLASS)
            sharp = sharpness[i] if sharpness is not None else None
            if s.min_sharpness is not None and sharp is not None and sharp < s.min_sharpness:
                reasons.append(BLURRY)
            k = int(best[i])
            verdicts.append(
                Verdict(
                    Prediction.model_construct(
                        label=self.labels[k],
                        class_index=k,
                        confidence=float(conf[i]),
                        margin=float(margin[i]),
                    ),
                    tuple(reasons),
                    sharp,
                )
            )
        return verdicts
