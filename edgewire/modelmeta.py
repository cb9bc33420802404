"""What a model declares about itself, so devices need no per-model code.

Every ONNX artefact edgewire ships carries one metadata entry, ``edgewire``, whose value is
the JSON form of :class:`ModelMeta`. Preprocessing, labels and the output's meaning are read
from it; a model without it is refused with a clear error instead of being guessed at.

The entry is read in three places (the device's engine, the Triton repository writer, and
the bridge asking Triton for a served model's config), all through :func:`parse_model_meta`
(:func:`onnx_model_meta` for an ONNX file's metadata),
so an operator sees one wording for one fault wherever it is found.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgewire.errors import ModelError

META_KEY = "edgewire"

# Every refusal ends with the same remedy: the entry is only ever written by an export step
# and copied from there, so fixing the export (or regenerating what was copied) is the fix.
_HOW_TO_FIX = (
    f"it must hold ModelMeta JSON (see edgewire.modelmeta): store meta.model_dump_json() under "
    f"'{META_KEY}' in the ONNX file's metadata when exporting (onnx.helper.set_model_props), and "
    "write Triton repositories with edgewire.cloud_bridge.model_repository, which copies it into config.pbtxt"
)
# Enough of pydantic's list to see what is wrong, short enough to read in a log line.
_MAX_PROBLEMS = 3


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


def parse_model_meta(raw: str | None, source: str) -> ModelMeta:
    """The model's contract from the text of its ``edgewire`` entry, or a :class:`ModelError`.

    ``source`` says where the entry was looked for, naming the file (``models/a.onnx (ONNX
    metadata)``, ``config.pbtxt of Triton model 'a'``); it starts every message. An absent or
    empty entry, text that is not JSON and JSON that is not a ModelMeta each get their own
    message, all ending in the same remedy.
    """
    if not raw:
        raise ModelError(
            f"{source}: no '{META_KEY}' entry, so the model's input, labels and output are unknown; {_HOW_TO_FIX}"
        )
    try:
        return ModelMeta.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["type"] == "json_invalid":
            raise ModelError(
                f"{source}: the '{META_KEY}' entry is not JSON ({errors[0]['msg']}); {_HOW_TO_FIX}"
            ) from exc
        problems = [f"{'.'.join(map(str, e['loc'])) or 'the whole entry'}: {e['msg']}" for e in errors]
        if len(problems) > _MAX_PROBLEMS:
            problems[_MAX_PROBLEMS:] = [f"and {len(problems) - _MAX_PROBLEMS} more"]
        raise ModelError(
            f"{source}: the '{META_KEY}' entry is not a valid ModelMeta ({'; '.join(problems)}); {_HOW_TO_FIX}"
        ) from exc


def onnx_model_meta(metadata: Mapping[str, str], path: str | Path) -> ModelMeta:
    """The contract in an ONNX file's metadata, as onnxruntime's ``custom_metadata_map`` or the
    onnx package's ``metadata_props`` give it, so the device and the repository writer refuse a
    broken file with the same words."""
    return parse_model_meta(metadata.get(META_KEY), f"{path} (ONNX metadata)")
