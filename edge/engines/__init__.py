"""Inference engines behind one small interface; pick one by name with :func:`create_engine`."""

from __future__ import annotations

from pathlib import Path

from edgewire.errors import ModelError
from edgewire.profiles import DeviceProfile

from .base import Engine


def create_engine(path: str | Path, profile: DeviceProfile) -> Engine:
    """The first backend of the profile that can load ``path``."""
    path = Path(path)
    if path.suffix == ".onnx" and "onnxruntime" in profile.backends:
        from .onnx import OnnxEngine

        return OnnxEngine(path, profile.onnxruntime)
    raise ModelError(
        f"{path}: no backend of profile '{profile.name}' ({', '.join(profile.backends)}) loads '{path.suffix}' files"
    )


__all__ = ["Engine", "create_engine"]
