"""What a model declares about itself, so devices need no per-model code.

Every ONNX artefact edgewire ships carries one metadata entry, ``edgewire``, whose value is
the JSON form of :class:`ModelMeta`. Preprocessing, labels and the output's meaning are read
from it; a model without it is refused with a clear error instead of being guessed at.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

META_KEY = "edgewire"


class InputSpec(BaseModel):
    """How a decoded frame becomes the model's input tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="input tensor name in the graph")
    # Batch dimension first, written as -1 when dynamic.
    shape: tuple[int, int, int, int]
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["gray", "bgr", "rgb"] = "gray"
    resize: Literal["stretch", "center_crop", "letterbox"] = "stretch"
    # value = (pixel * scale - mean) / std, per channel.
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: Literal["float32"] = "float32"

    @property
    def height(self) -> int:
        return self.shape[2] if self.layout == "NCHW" else self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[3] if self.layout == "NCHW" else self.shape[2]

    @property
    def channels(self) -> int:
        return self.shape[1] if self.layout == "NCHW" else self.shape[3]

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values (one per channel)")
        return self

    @field_validator("std")
    @classmethod
    def _no_zero_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s == 0 for s in v):
            raise ValueError("std must not contain 0")
        return v


class ModelMeta(BaseModel):
    """Identity, labels, input and output contract of one model artefact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    task: Literal["classification"] = "classification"
    labels: tuple[str, ...]
    input: InputSpec
    output: str = Field(description="output tensor name in the graph")
    output_kind: Literal["probabilities", "logits"] = "probabilities"
