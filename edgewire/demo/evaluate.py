"""Choosing the judge's threshold from data: accuracy against escalation rate and bytes sent.

A labelled set is replayed once through the edge model and once through the cloud model, with
the device's own preprocessing; every threshold is then scored without rerunning anything:
frames under the threshold take the cloud's answer, the rest keep the edge's. Bytes are those of
the real escalation requests the device would have sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgewire import envelopes as env
from edgewire.scoring import top2


@dataclass(frozen=True)
class Row:
    threshold: float
    escalation_rate: float
    accuracy: float
    bytes_sent: int


@dataclass(frozen=True)
class Replay:
    labels: np.ndarray  # true class per frame
    edge_best: np.ndarray
    edge_conf: np.ndarray
    cloud_best: np.ndarray
    request_bytes: np.ndarray  # size of the escalation request each frame would cost

    @property
    def edge_accuracy(self) -> float:
        return float(np.mean(self.edge_best == self.labels))

    @property
    def cloud_accuracy(self) -> float:
        return float(np.mean(self.cloud_best == self.labels))

    def at(self, threshold: float) -> Row:
        up = self.edge_conf < threshold
        answer = np.where(up, self.cloud_best, self.edge_best)
        return Row(
            threshold, float(np.mean(up)), float(np.mean(answer == self.labels)), int(self.request_bytes[up].sum())
        )

    def table(self, thresholds: list[float]) -> list[Row]:
        return [self.at(t) for t in thresholds]

    def best_within(self, budget: float, thresholds: list[float]) -> Row | None:
        """The most accurate threshold whose escalation rate stays within ``budget``."""
        fits = [r for r in self.table(thresholds) if r.escalation_rate <= budget]
        return max(fits, key=lambda r: (r.accuracy, -r.escalation_rate)) if fits else None


def predict_files(model: Path, frames: list[Path], batch: int = 64) -> np.ndarray:
    """Class probabilities for image files, through the device's own decode and preprocessing."""
    from edgewire.edge.engines.onnx import OnnxEngine
    from edgewire.preprocess import Preprocessor, read

    engine = OnnxEngine(model)
    pre = Preprocessor(engine.meta.input)
    probs = [
        engine.infer(pre.batch([read(str(p), pre.gray) for p in frames[i : i + batch]]))
        for i in range(0, len(frames), batch)
    ]
    return np.concatenate(probs)


def replay(
    frames: list[Path], label_of: Callable[[Path], int], edge_model: Path, cloud_model: Path, batch: int = 64
) -> Replay:
    outs = [predict_files(edge_model, frames, batch), predict_files(cloud_model, frames, batch)]
    edge_best, edge_conf, _ = top2(outs[0])
    cloud_best, _, _ = top2(outs[1])
    now = time.time()
    sizes = np.array(
        [
            len(
                env.encode(
                    env.Request(
                        trace_id="0123abcd-000000",
                        device_id="cam-01",
                        created=now,
                        deadline=now + 2,
                        model_hint="digits",
                        payload=p.read_bytes(),
                        content_type="image/jpeg",
                        reply_to="result/cam-01",
                        local=env.Prediction(label="0", class_index=0, confidence=0.5, margin=0.1),
                        reasons=["low_confidence"],
                    )
                )
            )
            for p in frames
        ]
    )
    labels = np.array([label_of(p) for p in frames])
    return Replay(labels, edge_best, edge_conf, cloud_best, sizes)
