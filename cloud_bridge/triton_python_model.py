"""Triton python-backend model that serves an ONNX file with onnxruntime.

This file is copied verbatim to ``<repository>/<model>/1/model.py`` and runs inside Triton's
python stub, whose interpreter sees the bridge's environment but must not depend on edgewire:
a model repository has to keep working when it is copied to a host without it.

The pytriton wheel carries only Triton's python backend, not the onnxruntime one, so this is
how the same ONNX artefact the NGC container serves natively gets served from the wheel.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# Triton's dynamic batcher already parallelises across requests; one thread per session keeps
# instances from fighting over cores. A model can ask for more with a config parameter.
_THREADS_PARAMETER = "intra_op_num_threads"


def _warn(message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)  # older stubs lack it
    if logger is not None:
        logger.log_warn(message)


def _int_parameter(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return int(value) if value.strip() else default


class TritonPythonModel:
    """One onnxruntime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = _int_parameter(config, _THREADS_PARAMETER, 1)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        # Without a batch dimension requests cannot be stacked; each one runs on its own.
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        return {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}

    def _response(self, outputs: list[np.ndarray]) -> Any:
        pairs = zip(self.output_names, outputs, strict=True)
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out)) for name, out in pairs]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _one_by_one(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._response(self._run(self._feeds(request))))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {exc}")))
        return responses

    def execute(self, requests: list[Any]) -> list[Any]:
        # One session.run over everything the dynamic batcher gathered amortises the per-call
        # overhead; the output is cut back at the same row offsets.
        if len(requests) == 1 or not self.batched:
            return self._one_by_one(requests)
        try:
            per_request = [self._feeds(r) for r in requests]
            sizes = [feeds[self.input_names[0]].shape[0] for feeds in per_request]
            batch = {name: np.concatenate([feeds[name] for feeds in per_request]) for name in self.input_names}
            outputs = self._run(batch)
        except Exception as exc:
            # A request the batch cannot hold (or that breaks the model) must fail alone.
            _warn(f"edgewire: batched run of {len(requests)} requests failed, running them one by one: {exc}")
            return self._one_by_one(requests)
        cuts = np.cumsum(sizes)[:-1]
        split = [np.split(out, cuts) for out in outputs]
        return [self._response([parts[i] for parts in split]) for i in range(len(requests))]

    def finalize(self) -> None:
        self.session = None
