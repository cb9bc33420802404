"""The detect path: a ``task: detect`` request answered with a list of detections.

Crops are relabelled by a classifier, or the frame is run by a detector and its boxes merged
with the device's own list (cloud_bridge.detect_merge). Kept apart from the bridge because it is
a request path of its own -- its own checks of the route, its own decoding (on the loop: a
request's crops are small, and a frame is decoded once for every target) and its own merge --
while the bridge around it stays the same for every task: admission, dedupe, answer, publish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from edgewire import envelopes as env
from edgewire.detection import DecodeSettings, decode_batch
from edgewire.errors import EdgewireError
from edgewire.preprocess import ImageRejected, Preprocessor, decode

from . import detect_merge
from .decoder import NOT_AN_IMAGE
from .dispatch import Answer, Dispatcher, Unavailable, failed_status
from .rules import Route

#: The bridge's answer builder (``Bridge._result``): every answer is metered and stamped alike.
ResultFactory = Callable[..., env.Result]


class DetectPath:
    def __init__(
        self, dispatcher: Dispatcher, preprocessor: Callable[[str, Any], Preprocessor], result: ResultFactory
    ) -> None:
        """``preprocessor``: the bridge's one preprocessor per model, shared with its classify
        path; ``result``: how the bridge builds an answer."""
        self.dispatcher = dispatcher
        self._preprocessor = preprocessor
        self._result = result

    async def answer(self, req: env.Request, route: Route, metas: dict[str, Any], received: float) -> env.Result:
        """The answer to a detect request routed to ``route``, whose models are ``metas``."""
        device_id, trace_id = req.device_id, req.trace_id
        tasks = {meta.task for meta in metas.values()}
        if len(tasks) > 1:
            reason = f"route {route.name!r} mixes classifiers and detectors; a detect request needs one kind"
            return self._result(device_id, trace_id, received, "rejected", reason=reason)
        merge = route.merge or ("replace" if tasks == {"detect"} else "relabel")
        if (merge == "relabel") != (tasks == {"classify"}):
            kind = "a classifier" if merge == "relabel" else "a detector"
            reason = f"route {route.name!r}: merge '{merge}' needs {kind}, and {', '.join(metas)} is not"
            return self._result(device_id, trace_id, received, "rejected", reason=reason)
        dispatched = time.time()
        try:
            if merge == "relabel":
                detections, answers = await self._relabel(req, route, metas)
            else:
                detections, answers = await self._detect(req, route, metas, merge)
        except detect_merge.Unanswerable as exc:
            return self._result(device_id, trace_id, received, "rejected", reason=str(exc))
        except (Unavailable, EdgewireError) as exc:
            status = failed_status(req.deadline)
            return self._result(device_id, trace_id, received, status, reason=str(exc), dispatched=dispatched)
        lead = answers[0] if answers else None
        return self._result(
            device_id,
            trace_id,
            received,
            "ok",
            dispatched=dispatched,
            inference_ms=max((a.inference_ms for a in answers), default=0.0),
            model=lead.model if lead else route.route_to[0],
            version=lead.version if lead else metas[route.route_to[0]].version,
            detections=detections,
        )

    async def _relabel(
        self, req: env.Request, route: Route, metas: dict[str, Any]
    ) -> tuple[list[env.Detection], list[Answer]]:
        pres = {m: self._preprocessor(m, meta) for m, meta in metas.items()}
        gray = all(pre.gray for pre in pres.values())
        pieces, boxes = detect_merge.pieces_to_classify(req, gray)
        # One dispatch per piece, all in this pass of the loop: the batcher sends them as one call.
        answers = await asyncio.gather(
            *(
                self.dispatcher.run(route, {m: pre.batch([piece]) for m, pre in pres.items()}, req.deadline)
                for piece in pieces
            )
        )
        predictions = [a.prediction for a in answers]
        if any(p is None for p in predictions):
            raise Unavailable(f"route {route.name!r}: a classifier gave no prediction")
        return detect_merge.relabel(req, boxes, predictions), list(answers)

    async def _detect(
        self, req: env.Request, route: Route, metas: dict[str, Any], merge: str
    ) -> tuple[list[env.Detection], list[Answer]]:
        pres = {m: self._preprocessor(m, meta) for m, meta in metas.items()}
        try:
            frame = decode(req.payload, all(pre.gray for pre in pres.values()))
        except ImageRejected as exc:
            raise detect_merge.Unanswerable(f"replace and union need the whole frame: {exc}") from None
        if frame is None or frame.size == 0:
            raise detect_merge.Unanswerable(f"replace and union need the whole frame: {NOT_AN_IMAGE}")
        answer = await self.dispatcher.run(route, {m: pre.batch([frame]) for m, pre in pres.items()}, req.deadline)
        model = answer.model if answer.model in metas else route.route_to[0]
        meta = metas[model]
        if answer.output is None or meta.detect is None:
            raise Unavailable(f"{model}: a detector gave no output")
        found = decode_batch(
            answer.output[None],
            meta.detect.format,
            [pres[model].geometry(frame)],
            DecodeSettings(),
            input_hw=(meta.input.height, meta.input.width),
        )[0]
        cloud = found.to_wire(meta.labels)
        merged = (
            detect_merge.union(req.detections, cloud)
            if merge == "union"
            else detect_merge.replace(req.detections, cloud)
        )
        return merged, [answer]
