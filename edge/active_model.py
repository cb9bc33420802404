"""The model a device serves with, as one value: engine, metadata, preprocessing and judge.

Its own module because both the agent (which serves it) and the model updater (which loads,
validates and swaps it) need it, and neither may import the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgewire.config import DetectSettings, JudgeSettings
from edgewire.detection import DecodeSettings
from edgewire.modelmeta import ModelMeta
from edgewire.preprocess import Preprocessor
from edgewire.profiles import DeviceProfile

from .engines import Engine, create_engine
from .judge import Judge
from .object_judge import ObjectJudge


@dataclass(frozen=True)
class ActiveModel:
    """What a batch runs with. Swapped as one reference, so no batch sees half of two models.

    A classifier is judged by ``judge``; a detector (``meta.task == "detect"``) is decoded with
    ``decode`` and judged per object by ``objects``."""

    engine: Engine
    meta: ModelMeta
    pre: Preprocessor
    judge: Judge
    objects: ObjectJudge | None = None
    decode: DecodeSettings | None = None

    @property
    def detects(self) -> bool:
        return self.meta.task == "detect"

    def compatible(self, other: ActiveModel) -> str | None:
        """Why ``other`` cannot stand in for this model, or None."""
        if other.meta.task != self.meta.task:
            return f"tasks differ ({other.meta.task} vs {self.meta.task})"
        if other.meta.labels != self.meta.labels:
            return f"labels differ ({len(other.meta.labels)} vs {len(self.meta.labels)})"
        return None

    def judged_by(self, settings: JudgeSettings, detect: DetectSettings | None = None) -> ActiveModel:
        """The same loaded model under new judge settings (an over-the-air change)."""
        return _assemble(self.engine, self.pre, settings, detect)


def _assemble(engine: Engine, pre: Preprocessor, judge: JudgeSettings, detect: DetectSettings | None) -> ActiveModel:
    meta = engine.meta
    if meta.task != "detect":
        return ActiveModel(engine, meta, pre, Judge(judge, meta.labels))
    d = detect or DetectSettings()
    decode = DecodeSettings(
        score_threshold=d.score_threshold,
        iou_threshold=d.iou_threshold,
        max_detections=d.max_detections,
        map_threshold=d.map_threshold,
        unclip_ratio=d.unclip_ratio,
    )
    return ActiveModel(engine, meta, pre, Judge(judge, meta.labels), ObjectJudge(d.judge, meta.labels), decode)


def load_model(
    path: str | Path, profile: DeviceProfile, judge: JudgeSettings, detect: DetectSettings | None = None
) -> ActiveModel:
    """Load a model ready to serve (blocking: call it off the event loop when serving). A model
    whose outputs fit nothing it declares or shows is refused here (``ModelError``)."""
    engine = create_engine(path, profile)
    return _assemble(engine, Preprocessor(engine.meta.input), judge, detect)
