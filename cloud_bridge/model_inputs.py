"""Each model's input tensors from a request's image: one preprocessor per model, shared by
every request path, and the decoding done either on the event loop or by the decode workers
(cloud_bridge.decoder). Kept apart from the bridge so the classify and detect paths read the
same preprocessors, and the choice of where to decode stays the bridge's alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgewire.preprocess import ImageRejected, Preprocessor, decode

from .decoder import DecodePool


class ModelInputs:
    def __init__(self) -> None:
        self._pre: dict[str, Preprocessor] = {}
        self._spec_ids: dict[str, int] = {}  # model -> its input spec's id in the decode pool

    def preprocessor(self, model: str, meta: Any) -> Preprocessor:
        pre = self._pre.get(model)
        if pre is None:
            pre = self._pre[model] = Preprocessor(meta.input)
        return pre

    def tensors(self, payload: bytes, metas: dict[str, Any]) -> dict[str, np.ndarray] | None:
        """Decoded on the loop, once per colour mode for all models; ``None`` when the payload is
        not an image they can read (the request is answered ``rejected``, not failed)."""
        out: dict[str, np.ndarray] = {}
        images: dict[bool, np.ndarray | None] = {}
        for model, meta in metas.items():
            pre = self.preprocessor(model, meta)
            if pre.gray not in images:
                try:
                    images[pre.gray] = decode(payload, pre.gray)
                except ImageRejected:
                    return None
            image = images[pre.gray]
            if image is None or image.size == 0:
                return None
            out[model] = pre.batch([image])
        return out

    async def decoded(self, decoder: DecodePool, payload: bytes, metas: dict[str, Any]) -> dict[str, np.ndarray]:
        """The same tensors as ``tensors``, from the decode workers (a burst per loop pass)."""
        sids = []
        for model, meta in metas.items():
            sid = self._spec_ids.get(model)
            if sid is None:
                sid = self._spec_ids[model] = decoder.spec_id(meta.input)
            sids.append(sid)
        arrays = await decoder.decode(payload, tuple(sids))
        return dict(zip(metas, arrays, strict=True))
