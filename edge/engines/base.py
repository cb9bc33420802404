"""The one interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from edgewire.modelmeta import ModelMeta


class Engine(ABC):
    """A loaded model. ``infer`` is called from the inference thread, one batch at a time."""

    #: Registry key used in device profiles and configs.
    backend: str = ""
    meta: ModelMeta

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch in the model's input layout. A classifier returns class probabilities,
        N x classes; a detector its raw output, batch first, for ``edgewire.detection`` to decode."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release the backend's resources."""


def to_probabilities(meta: ModelMeta, output: np.ndarray) -> np.ndarray:
    if meta.output_kind == "logits":
        shifted = output - output.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)
    return output
