"""The model a device serves with, as one value: engine, metadata, preprocessing and judge.

Its own module because both the agent (which serves it) and the model updater (which loads,
validates and swaps it) need it, and neither may import the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgewire.config import JudgeSettings
from edgewire.modelmeta import ModelMeta
from edgewire.preprocess import Preprocessor
from edgewire.profiles import DeviceProfile

from .engines import Engine, create_engine
from .judge import Judge


@dataclass(frozen=True)
class ActiveModel:
    """What a batch runs with. Swapped as one reference, so no batch sees half of two models."""

    engine: Engine
    meta: ModelMeta
    pre: Preprocessor
    judge: Judge

    def compatible(self, other: ActiveModel) -> str | None:
        """Why ``other`` cannot stand in for this model, or None."""
        if other.meta.labels != self.meta.labels:
            return f"labels differ ({len(other.meta.labels)} vs {len(self.meta.labels)})"
        return None

    def judged_by(self, settings: JudgeSettings) -> ActiveModel:
        """The same loaded model under new judge settings (an over-the-air change)."""
        return ActiveModel(self.engine, self.meta, self.pre, Judge(settings, self.meta.labels))


def load_model(path: str | Path, profile: DeviceProfile, judge: JudgeSettings) -> ActiveModel:
    """Load a model ready to serve (blocking: call it off the event loop when serving)."""
    engine = create_engine(path, profile)
    meta = engine.meta
    return ActiveModel(engine, meta, Preprocessor(meta.input), Judge(judge, meta.labels))
