"""ONNX Runtime backend: the default on CPUs, and the fallback on Jetsons."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgewire.errors import ModelError
from edgewire.modelmeta import GraphInfo, read_model
from edgewire.profiles import OnnxRuntimeSettings

from .base import Engine, to_probabilities

log = logging.getLogger(__name__)


class OnnxEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, settings: OnnxRuntimeSettings | None = None) -> None:
        path = Path(path)
        settings = settings or OnnxRuntimeSettings()
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads
        opts.inter_op_num_threads = settings.inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        providers = [p for p in settings.providers if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        self.path = path
        # Refused here, at load, when the outputs fit no task the model declares or shows: a
        # frame never meets a model it cannot be read by.
        self.reading = read_model(path, GraphInfo.from_session(self.session))
        self.meta = self.reading.require()
        if self.reading.source != "edgewire":
            log.info(
                "%s: no edgewire entry; inferred from the %s: %s",
                path,
                "exporter's metadata and the graph" if self.reading.source == "exporter" else "graph",
                ", ".join(f"{k} from {v}" for k, v in self.reading.inferred.items()),
            )
        self._classify = self.meta.task == "classify"
        self._fixed_batch = self.meta.input.shape[0] if self.meta.input.shape[0] > 0 else None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        feeds_name, out = self.meta.input.name, [self.meta.output]
        if self._fixed_batch is None or len(batch) == self._fixed_batch:
            result = self.session.run(out, {feeds_name: batch})[0]
        else:
            # A fixed-batch graph gets full chunks; the last one is zero-padded, its padding dropped.
            step = self._fixed_batch
            parts = []
            for i in range(0, len(batch), step):
                chunk = batch[i : i + step]
                n = len(chunk)
                if n < step:
                    chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
                parts.append(self.session.run(out, {feeds_name: chunk})[0][:n])
            result = np.concatenate(parts)
        return to_probabilities(self.meta, result) if self._classify else result
