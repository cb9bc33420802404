"""Device profiles: what a kind of hardware can run, so one config serves a mixed fleet."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgewire.config import StrictModel, load_yaml_model
from edgewire.errors import ConfigError


class OnnxRuntimeSettings(StrictModel):
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    intra_op_threads: int = Field(0, ge=0)
    inter_op_threads: int = Field(1, ge=0)


class Limits(StrictModel):
    memory_limit_mb: int = Field(gt=0)
    max_batch: int = Field(ge=1)
    latency_budget_ms: float = Field(gt=0)


class Camera(StrictModel):
    default_device: int | str = 0
    gstreamer: str | None = None


class Hardware(StrictModel):
    """What the board is, as its vendor documents it; shown to operators, used for limits."""

    cpu: str
    cpu_cores: int = Field(gt=0)
    gpu: str | None = None
    dla_cores: int = Field(0, ge=0)
    memory_mb: int = Field(gt=0)
    ai_tops: float | None = Field(None, gt=0, description="vendor's INT8 (sparse where stated) figure")
    software: str | None = Field(None, description="OS / SDK the profile assumes, e.g. JetPack 6")


class DeviceProfile(StrictModel):
    name: str
    description: str
    hardware: Hardware | None = None
    backends: list[Literal["onnxruntime", "tensorrt"]]
    precisions: list[Literal["fp32", "fp16", "int8"]]
    onnxruntime: OnnxRuntimeSettings = Field(default_factory=OnnxRuntimeSettings)
    limits: Limits
    camera: Camera = Field(default_factory=Camera)


def _shipped() -> dict[str, Path]:
    folder = resources.files("edgewire.device_profiles")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def available_profiles() -> list[str]:
    return sorted(_shipped())


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or a profile file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        shipped = _shipped()
        if str(name_or_path) not in shipped:
            raise ConfigError(
                f"unknown device profile {str(name_or_path)!r}; "
                f"shipped profiles: {', '.join(sorted(shipped))} "
                "(or give the path of a profile file)"
            )
        path = shipped[str(name_or_path)]
    return load_yaml_model(path, DeviceProfile)
