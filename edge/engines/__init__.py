"""Inference engines behind one small interface; pick one by name with :func:`create_engine`."""

from __future__ import annotations

from pathlib import Path

from edgewire.errors import ModelError
from edgewire.profiles import DeviceProfile

from .base import Engine

#: Serialised TensorRT engines, as trtexec and the TensorRT builder write them.
TENSORRT_SUFFIXES = (".plan", ".engine")


def create_engine(path: str | Path, profile: DeviceProfile) -> Engine:
    """The first backend of the profile that can load ``path``."""
    path = Path(path)
    if path.suffix == ".onnx" and "onnxruntime" in profile.backends:
        from .onnx import OnnxEngine

        return OnnxEngine(path, profile.onnxruntime)
    if path.suffix in TENSORRT_SUFFIXES:
        raise ModelError(
            f"{path}: a TensorRT engine is built for one GPU and TensorRT version and runs only on the "
            f"'tensorrt' backend, on the Jetson it was built on (profile '{profile.name}' has "
            f"{', '.join(profile.backends)}; this build of edgewire has no TensorRT engine). "
            "Serve the ONNX export instead (onnxruntime uses the TensorRT or CUDA execution provider "
            "where the profile lists it), or build the .plan on the device from that ONNX with trtexec"
        )
    raise ModelError(
        f"{path}: no backend of profile '{profile.name}' ({', '.join(profile.backends)}) loads '{path.suffix}' files"
    )


__all__ = ["Engine", "create_engine"]
